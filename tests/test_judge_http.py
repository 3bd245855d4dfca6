"""The judge client against real local HTTP servers: redirects are refused (the API key never
reaches another host), a request has an overall deadline (a server dripping one byte every
0.9 s cannot hold it), replies have a size cap, and the cache key covers the URL and every
request setting."""

from __future__ import annotations

import time

import pytest
from judge_server import ChatServer, DripServer, chat_reply

from mllm_pib.evaluation.judge import JudgeClient, JudgeConfig, JudgeError

KEY = "sk-secret-redirect-test"


def client(url: str, **overrides) -> JudgeClient:
    config = dict(url=url, model="judge-1", timeout_s=5, max_retries=0, backoff_s=0.01)
    return JudgeClient(JudgeConfig(**{**config, **overrides}))


@pytest.fixture
def servers():
    made: list = []

    def make(server):
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_redirect_to_another_host_or_port_is_refused(code, host, servers, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    other = servers(ChatServer(lambda path, body: (200, chat_reply("stolen"), {})))
    target = f"http://{host}:{other.port}/v1/chat/completions"
    first = servers(ChatServer(lambda path, body: (code, b"", {"Location": target})))
    judge = client(first.url, api_key_env="JUDGE_TEST_KEY")
    with pytest.raises(JudgeError, match=rf"HTTP {code} redirect to '{target}' not followed"):
        judge.complete("Judgement please")
    assert first.headers == [f"Bearer {KEY}"]  # the configured endpoint gets the key
    assert other.requests == [] and other.headers == []  # the other host gets nothing at all


def test_same_host_redirect_is_refused_too(servers, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    server = servers(ChatServer(lambda path, body: (302, b"", {"Location": "/v2/chat/completions"})
                                if path.startswith("/v1") else (200, chat_reply("moved"), {})))
    with pytest.raises(JudgeError, match="HTTP 302 redirect"):
        client(server.url, api_key_env="JUDGE_TEST_KEY").complete("x")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "head, drip",
    [
        (b"", b"HTTP/1.1 200 OK\r\n"),  # the status line itself drips
        (b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", b'{"choices": [{"message": {"content": "x"'),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b'{"choices": [{"message": {"content": "x"}}]}'),
    ],
    ids=["status-line", "body", "body-without-length"],
)
def test_a_dripping_server_cannot_outlast_the_deadline(head, drip, servers):
    server = servers(DripServer(head, drip, interval=0.9))
    judge = client(server.url, timeout_s=1.0, max_retries=0)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"no complete reply within 1s"):
        judge.complete("x")
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.8, elapsed  # (unbounded, the drip would last 15-40 s)


def test_the_deadline_is_retried_like_a_timeout(servers):
    server = servers(DripServer(b"", b"HTTP/1.1 200", interval=0.9))
    with pytest.raises(JudgeError, match="giving up after 2 tries: no complete reply within 0.5s"):
        client(server.url, timeout_s=0.5, max_retries=1).complete("x")
    assert server.connections == 2


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
def test_oversized_reply_is_refused(declared, servers):
    body = b'{"choices": [{"message": {"content": "' + b"a" * 5000 + b'"}}]}'
    # without a Content-Length the body ends when the server closes the connection
    extra = {} if declared else {"Content-Length": None, "Connection": "close"}
    server = servers(ChatServer(lambda path, request: (200, body, extra)))
    judge = client(server.url, max_response_bytes=1000)
    with pytest.raises(JudgeError, match="exceeds the 1000-byte cap"):
        judge.complete("x")
    assert client(server.url, max_response_bytes=len(body)).complete("x") == "a" * 5000


def test_cache_key_holds_the_url_and_every_request_setting(servers, tmp_path):
    replies = iter(f"reply {i}" for i in range(100))
    one = servers(ChatServer(lambda path, body: (200, chat_reply(next(replies)), {})))
    two = servers(ChatServer(lambda path, body: (200, chat_reply(next(replies)), {})))
    cache = tmp_path / "cache.jsonl"
    first = client(one.url, cache_path=cache).complete("prompt")
    assert client(one.url + "/", cache_path=cache).complete("prompt") == first  # the same endpoint
    assert len(one.requests) == 1
    assert client(two.url, cache_path=cache).complete("prompt") != first  # another URL: asked anew
    assert len(two.requests) == 1
    changes = [
        {"temperature": 0.0}, {"top_p": 0.5}, {"max_tokens": 100}, {"stop": ["END"]}, {"stop": None},
        {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"logit_bias": {}}, {"logit_bias": None},
    ]
    for n, change in enumerate(changes, start=2):
        judge = client(one.url, cache_path=cache, request=change)
        judge.complete("prompt")
        assert len(one.requests) == n, change
        sent = one.requests[-1]
        for key, value in change.items():
            assert sent.get(key) == value, (key, sent)
    assert client(one.url, cache_path=cache, model="judge-2").complete("prompt") not in (first,)
    assert len(one.requests) == len(changes) + 2
    # and each of them is cached under its own key
    for change in changes:
        client(one.url, cache_path=cache, request=change).complete("prompt")
    assert len(one.requests) == len(changes) + 2
