"""A judge LLM behind any OpenAI-compatible chat-completions endpoint.

``POST {url}/chat/completions`` with ``{"model", "messages": [{"role": "user", ...}], ...}`` and
the sampling settings of :class:`JudgeRequest` (HA-DPO's SHR settings by default); the reply is
``choices[0].message.content``. Requests run in a bounded thread pool; transient failures (HTTP
429 and 5xx, timeouts, dropped connections) are retried with exponential backoff; a reply the
caller does not accept (e.g. one without a ``Judgement:`` line) is asked again, a bounded number
of times. Accepted replies are appended to an on-disk cache keyed by a hash of the URL, the
model, every request setting and the prompt, so an interrupted or repeated evaluation never asks
the same question twice.

The API key is read from the environment variable the config names; it is sent only as the
``Authorization`` header of requests to the configured URL (redirects are refused) and never
logged, cached or written anywhere. Each request has an overall deadline and a cap on the reply
size (:mod:`mllm_pib.evaluation.http_client`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mllm_pib.errors import UserError
from mllm_pib.evaluation import http_client
from mllm_pib.io import append_jsonl, read_jsonl, repair_jsonl_tail

logger = logging.getLogger(__name__)


class JudgeError(UserError):
    """The judge endpoint failed for good (bad request, bad reply, or retries exhausted)."""


class JudgeRequest(BaseModel):
    """Sampling settings sent with every request; the defaults are HA-DPO's SHR settings
    (``gpt_utils.py``: temperature 0.7, top_p 1, one choice, at most 800 tokens, stop at
    ``###``, no penalties, token 50256 ``<|endoftext|>`` banned). A field set to ``None`` is
    not sent."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = 0.7
    top_p: float | None = 1.0
    n: Literal[1] = 1
    max_tokens: int | None = Field(default=800, gt=0)
    stream: Literal[False] = False
    stop: list[str] | None = Field(default_factory=lambda: ["###"])
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = Field(default_factory=lambda: {"50256": -100})


class JudgeConfig(BaseModel):
    """Where and how to ask the judge.

    Attributes:
        url: base URL of the API, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request (``gpt-4``, as HA-DPO).
        request: sampling settings sent with each request.
        api_key_env: name of the environment variable holding the API key (none: no header).
        timeout_s: deadline for one whole request (connect, send, complete reply).
        max_response_bytes: longest reply body accepted.
        max_retries: retries of a transient failure before giving up.
        backoff_s: first retry delay; doubled at each retry, capped at ``max_backoff_s``.
        reasks: how many times a reply the caller does not accept is asked again.
        concurrency: requests in flight at once.
        cache_path: JSON-lines judgment cache (none: no cache).
    """

    model_config = ConfigDict(extra="forbid")

    url: str
    model: str = "gpt-4"
    request: JudgeRequest = Field(default_factory=JudgeRequest)
    api_key_env: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    max_response_bytes: int = Field(default=4 * 2**20, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)
    reasks: int = Field(default=5, ge=0)
    concurrency: int = Field(default=4, ge=1)
    cache_path: Path | None = None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's requested delay, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class JudgeClient:
    """Ask a chat-completions judge, with retries, bounded concurrency and a reply cache.

    Example::

        judge = JudgeClient(JudgeConfig(url="http://127.0.0.1:8000/v1", model="judge",
                                        cache_path=out / "judge_cache.jsonl"))
        replies = judge.complete_many(prompts, accept=lambda reply: "Judgement:" in reply)
    """

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._api_key = read_api_key(config.api_key_env)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        if config.cache_path is not None:
            repair_jsonl_tail(config.cache_path)
            if config.cache_path.exists():
                self._cache = _read_cache(config.cache_path)
        self.requests_made = 0
        self.rejected_replies = 0

    def describe(self) -> dict:
        """What identifies this judge's answers: endpoint, model and request settings."""
        return {"url": self.config.endpoint, "model": self.config.model, "request": self.config.request.model_dump()}

    def cache_key(self, prompt: str) -> str:
        """SHA-256 of endpoint, model, every request setting and the prompt."""
        identity = {**self.describe(), "prompt": prompt}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    def complete(self, prompt: str, accept: Callable[[str], bool] | None = None) -> str:
        """The judge's reply to ``prompt``: the cached one when it was asked before, else a new
        one, asked again up to ``reasks`` times while ``accept`` refuses it. Only accepted
        replies are cached; the last refused one is returned uncached, so a rerun asks again."""
        accept = accept or (lambda reply: True)
        key = self.cache_key(prompt)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and accept(cached):
            return cached
        for attempt in range(self.config.reasks + 1):
            reply = self._ask_with_retries(prompt)
            if accept(reply):
                self._store(key, reply)
                return reply
            with self._lock:
                self.rejected_replies += 1
            logger.warning("judge: reply %d/%d not in the expected form", attempt + 1, self.config.reasks + 1)
        return reply

    def complete_many(
        self, prompts: list[str], accept: Callable[[str], bool] | None = None, progress: bool = True
    ) -> list[str]:
        """Replies to ``prompts`` in order (see :meth:`complete`); each distinct prompt is asked once."""
        unique = list(dict.fromkeys(prompts))
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            jobs = pool.map(lambda prompt: self.complete(prompt, accept), unique)
            replies = dict(zip(unique, tqdm(jobs, total=len(unique), desc="judge", disable=not progress)))
        return [replies[p] for p in prompts]

    def _store(self, key: str, reply: str) -> None:
        with self._lock:
            self._cache[key] = reply
            if self.config.cache_path is not None:
                append_jsonl(self.config.cache_path, [{"key": key, "model": self.config.model, "reply": reply}])

    def _ask_with_retries(self, prompt: str) -> str:
        cfg = self.config
        attempt = 0
        while True:
            try:
                return self._ask(prompt)
            except _Transient as err:
                if attempt == cfg.max_retries:
                    raise JudgeError(f"judge at {cfg.url}: giving up after {attempt + 1} tries: {err}") from None
                delay = min(cfg.backoff_s * 2**attempt, cfg.max_backoff_s)
                if err.retry_after is not None:
                    delay = min(max(delay, err.retry_after), cfg.max_backoff_s)
                attempt += 1
                logger.warning("judge: %s; retry %d/%d in %.1fs", err, attempt, cfg.max_retries, delay)
                time.sleep(delay)

    def _ask(self, prompt: str) -> str:
        cfg = self.config
        body = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            **cfg.request.model_dump(exclude_none=True),
        }
        credentials = {"Authorization": f"Bearer {self._api_key}"} if self._api_key is not None else None
        with self._lock:
            self.requests_made += 1
        try:
            reply = http_client.post(
                cfg.endpoint,
                json.dumps(body).encode("utf-8"),
                {"Content-Type": "application/json"},
                deadline_s=cfg.timeout_s,
                max_bytes=cfg.max_response_bytes,
                credentials=credentials,
            )
        except http_client.TransportError as err:
            raise _Transient(str(err)) from None
        except (http_client.RedirectRefused, http_client.ResponseTooLarge) as err:
            raise JudgeError(f"judge at {cfg.endpoint}: {err}") from None
        if reply.status == 429 or reply.status >= 500:
            raise _Transient(f"HTTP {reply.status}", _retry_after(reply.headers.get("Retry-After")))
        if reply.status != 200:
            detail = reply.body[:300].decode("utf-8", "replace")
            raise JudgeError(f"judge at {cfg.endpoint}: HTTP {reply.status}: {detail}")
        return _reply_text(reply.body, cfg.endpoint)


def read_api_key(env: str | None) -> str | None:
    """The API key in environment variable ``env`` (none when no variable is named)."""
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise UserError(f"the judge API key variable {env} is not set (or empty) in the environment")
    return key


def _read_cache(path: Path) -> dict[str, str]:
    cache = {}
    for lineno, record in enumerate(read_jsonl(path), start=1):
        if not isinstance(record.get("key"), str) or not isinstance(record.get("reply"), str):
            raise UserError(f"{path} record {lineno}: a judge cache line needs string 'key' and 'reply'")
        cache[record["key"]] = record["reply"]
    return cache


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the exponential backoff applies


def _reply_text(raw: bytes, endpoint: str) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"judge at {endpoint}: not a chat-completions reply: {raw[:300]!r}") from None
    if not isinstance(content, str):
        raise JudgeError(f"judge at {endpoint}: reply content is {type(content).__name__}, expected text")
    return content
