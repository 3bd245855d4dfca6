"""A judge LLM behind any OpenAI-compatible chat-completions endpoint.

``POST {url}/chat/completions`` with ``{"model", "messages": [{"role": "user", ...}],
"temperature"}``; the reply is ``choices[0].message.content``. Requests run in a bounded thread
pool, transient failures (HTTP 429 and 5xx, timeouts, dropped connections) are retried with
exponential backoff, and every reply is appended to an on-disk cache keyed by a hash of model
and prompt, so an interrupted or repeated evaluation never asks the same question twice.

The API key is read from the environment variable the config names; it is sent only as the
``Authorization`` header and never logged, cached or written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mllm_pib.errors import UserError
from mllm_pib.io import append_jsonl, read_jsonl, repair_jsonl_tail

logger = logging.getLogger(__name__)


class JudgeError(UserError):
    """The judge endpoint failed for good (bad request, bad reply, or retries exhausted)."""


class JudgeConfig(BaseModel):
    """Where and how to ask the judge.

    Attributes:
        url: base URL of the API, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: model name sent with each request.
        api_key_env: name of the environment variable holding the API key (none: no header).
        temperature: sampling temperature (0.7 as in HA-DPO's SHR).
        max_tokens: reply length limit sent to the endpoint (none: the endpoint's default).
        timeout_s: seconds to wait for one HTTP response.
        max_retries: retries of a transient failure before giving up.
        backoff_s: first retry delay; doubled at each retry, capped at ``max_backoff_s``.
        concurrency: requests in flight at once.
        cache_path: JSON-lines judgment cache (none: no cache).
    """

    model_config = ConfigDict(extra="forbid")

    url: str
    model: str
    api_key_env: str | None = None
    temperature: float = 0.7
    max_tokens: int | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)
    concurrency: int = Field(default=4, ge=1)
    cache_path: Path | None = None


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
        replies = judge.complete_many(prompts)
    """

    def __init__(self, config: JudgeConfig):
        self.config = config
        self._api_key = self._read_api_key(config.api_key_env)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}
        if config.cache_path is not None:
            repair_jsonl_tail(config.cache_path)
            if config.cache_path.exists():
                self._cache = _read_cache(config.cache_path)
        self.requests_made = 0

    @staticmethod
    def _read_api_key(env: str | None) -> str | None:
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise UserError(f"the judge API key variable {env} is not set (or empty) in the environment")
        return key

    def cache_key(self, prompt: str) -> str:
        """SHA-256 of model and prompt: the identity of a judgment in the cache."""
        return hashlib.sha256(json.dumps([self.config.model, prompt]).encode("utf-8")).hexdigest()

    def complete(self, prompt: str) -> str:
        """The judge's reply to ``prompt`` (from the cache when asked before)."""
        key = self.cache_key(prompt)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        reply = self._ask_with_retries(prompt)
        with self._lock:
            self._cache[key] = reply
            if self.config.cache_path is not None:
                append_jsonl(self.config.cache_path, [{"key": key, "model": self.config.model, "reply": reply}])
        return reply

    def complete_many(self, prompts: list[str], progress: bool = True) -> list[str]:
        """Replies to ``prompts`` in order; each distinct prompt is asked at most once."""
        unique = list(dict.fromkeys(prompts))
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            jobs = pool.map(self.complete, unique)
            replies = dict(zip(unique, tqdm(jobs, total=len(unique), desc="judge", disable=not progress)))
        return [replies[p] for p in prompts]

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
        body = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}], "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        endpoint = cfg.url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers)
        with self._lock:
            self.requests_made += 1
        try:
            with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read(300).decode("utf-8", "replace")
            if err.code == 429 or err.code >= 500:
                raise _Transient(f"HTTP {err.code}", _retry_after(err.headers.get("Retry-After"))) from None
            raise JudgeError(f"judge at {endpoint}: HTTP {err.code}: {detail}") from None
        except TimeoutError as err:
            raise _Transient(f"timed out after {cfg.timeout_s}s ({err})") from None
        except urllib.error.URLError as err:
            raise _Transient(f"connection failed: {err.reason}") from None
        except ConnectionError as err:
            raise _Transient(f"connection failed: {err}") from None
        return _reply_text(raw, endpoint)


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
