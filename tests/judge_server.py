"""Real HTTP servers on 127.0.0.1 (threads) standing in for a chat-completions judge and for
hostile endpoints: scripted replies, redirects, a server that drips bytes, oversized replies."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# respond(path, body) -> (status, payload: dict | bytes, extra headers)
Responder = Callable[[str, dict], tuple[int, "dict | bytes", dict]]


class ChatServer:
    """A chat-completions endpoint at ``self.url`` (``http://127.0.0.1:<port>/v1``) answering with
    ``respond``; it records every request body and ``Authorization`` header. Extra headers
    replace the defaults; a header set to ``None`` is not sent."""

    def __init__(self, respond: Responder, host: str = "127.0.0.1"):
        self.requests: list[dict] = []
        self.headers: list[str | None] = []
        self.respond = respond
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.reply(body)

            def do_GET(self):  # where a client that follows a 301-303 would land
                self.reply({})

            def reply(self, body: dict):
                server.requests.append(body)
                server.headers.append(self.headers.get("Authorization"))
                code, payload, extra = server.respond(self.path, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    # Content-Length unless extra says otherwise (None: no such header)
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **extra}
                    for key, value in headers.items():
                        if value is not None:
                            self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat_reply(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


class DripServer:
    """Answers every connection by sending ``head`` at once, then ``drip`` one byte every
    ``interval`` seconds, until the client hangs up or ``drip`` is sent."""

    def __init__(self, head: bytes, drip: bytes, interval: float = 0.9):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.head, self.drip, self.interval = head, drip, interval
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket):
        with conn:
            try:
                conn.recv(65536)  # the request
                conn.sendall(self.head)
                for byte in self.drip:
                    time.sleep(self.interval)
                    conn.sendall(bytes([byte]))
            except OSError:
                pass  # the client hung up

    def close(self):
        self.listener.close()
