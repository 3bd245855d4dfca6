"""One HTTP POST with an overall deadline, a cap on the reply size, and no redirects.

urllib's ``timeout`` bounds each socket operation, not the request: a server that sends one byte
every 0.9 s keeps a request with a 1 s timeout open for as long as it likes. Here a timer shuts the
request's socket down when the deadline passes, whatever the request is doing (connecting, sending,
waiting for the status line, reading the body). Redirects are never followed: an API endpoint has
no reason to redirect a POST, and following one would hand the request's credentials to whichever
host the server names. Proxies from the environment are used as urllib uses them.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message


class TransportError(Exception):
    """The request failed on the way (connection refused or dropped, a truncated reply)."""


class DeadlineExceeded(TransportError):
    """No complete reply within the deadline."""


class RedirectRefused(Exception):
    """The server answered with a redirect, which is not followed."""


class ResponseTooLarge(Exception):
    """The reply is longer than the cap."""


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes


def post(
    url: str,
    payload: bytes,
    headers: dict[str, str],
    *,
    deadline_s: float,
    max_bytes: int,
    credentials: dict[str, str] | None = None,
) -> Reply:
    """POST ``payload`` to ``url`` and return the reply, whatever its status (3xx excepted).

    ``credentials`` are headers such as ``Authorization``: urllib keeps them out of any
    follow-up request. Raises :class:`DeadlineExceeded` when the whole exchange takes longer
    than ``deadline_s`` seconds, :class:`ResponseTooLarge` beyond ``max_bytes`` of body,
    :class:`RedirectRefused` on a 3xx and :class:`TransportError` on a network failure.
    """
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    for name, value in (credentials or {}).items():
        request.add_unredirected_header(name, value)
    deadline = _Deadline(deadline_s)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline), _NoRedirect())
    try:
        try:
            response = opener.open(request, timeout=deadline_s)
        except urllib.error.HTTPError as err:  # a non-2xx reply: still a reply
            response = err
        with response:
            reply = Reply(response.getcode(), response.headers, _read_capped(response, max_bytes))
    except (OSError, http.client.HTTPException) as err:
        # a socket timeout is the deadline too: no socket operation may outlast what remains of it
        if deadline.expired or isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            raise DeadlineExceeded(f"no complete reply within {deadline_s:g}s") from None
        raise TransportError(_describe(err)) from None
    finally:
        deadline.cancel()
    if deadline.expired:  # the socket was shut while a length-less body was being read
        raise DeadlineExceeded(f"no complete reply within {deadline_s:g}s")
    if 300 <= reply.status < 400:
        raise RedirectRefused(f"HTTP {reply.status} redirect to {reply.headers.get('Location')!r} not followed")
    return reply


def _read_capped(response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge(f"reply of {int(declared)} bytes exceeds the {max_bytes}-byte cap")
    body = response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise ResponseTooLarge(f"reply exceeds the {max_bytes}-byte cap")
    return body


def _describe(err: BaseException) -> str:
    reason = getattr(err, "reason", None)  # URLError wraps the socket error
    return f"connection failed: {reason or err or type(err).__name__}"


class _Deadline:
    """Shuts down every socket it watches once ``seconds`` have passed since it was made."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)
        return sock

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._sockets.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # the plain socket method: it wakes a blocked reader of a TLS socket too (SSLSocket.shutdown
    # would first drop the TLS state under that reader); a closed socket has fd -1, so a socket
    # already closed can never hit a reused descriptor
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _DeadlineConnection:
    """Mixed into http.client's connections: each socket they open is watched by the deadline."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        self.deadline = deadline
        super().__init__(*args, **kwargs)

    def connect(self):
        self.timeout = self.deadline.remaining()
        create = self._create_connection
        self._create_connection = lambda *args, **kwargs: self.deadline.watch(create(*args, **kwargs))
        super().connect()
        self.deadline.watch(self.sock)  # the TLS socket wrapping the watched one


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx reaches the caller as an HTTPError
