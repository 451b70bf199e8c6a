"""Requests real clients and hostile ones send that once got a 500, a wrong or unreadable answer, or slowed everyone
else: deeply nested JSON, chat templates that refuse a conversation, non-finite or huge penalties, pydantic's union
tags in messages, a huge prompt tokenized on the event loop, developer messages, top_p=0, n below 1, clients hanging
up mid-body or before a stream starts, and long stop strings (counted operations, not time)."""

from __future__ import annotations

import pytest

JSON = {"content-type": "application/json"}
CHAT = [{"role": "user", "content": "How do you boil water?"}]


def assert_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize("depth,status", [(100, 200), (5000, 400), (100_000, 400)])
def test_deeply_nested_json_is_a_400(client, depth, status):
    body = '{"prompt": "x", "max_tokens": 1, "extra": ' + "[" * depth + "]" * depth + "}"
    r = client.post("/v1/completions", content=body, headers=JSON)
    if status == 200:  # shallow enough to parse: the unknown field is ignored
        assert r.status_code == 200, r.text
    else:
        assert "nested too deeply" in assert_error(r, 400)["message"]


def test_chat_template_that_refuses_the_messages_is_a_400(backend, tiny):
    import copy

    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    tok = copy.deepcopy(tiny[1])  # like Gemma's or Mistral's templates, which raise on a role they do not know
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n")
    app = create_app(ServeConfig(model="tiny", served_model_name="tiny"), backend=backend, tokenizer=tok)
    with TestClient(app) as client:
        # a leading system message rides in the first user turn (as Gemma 3's own template carries it) ...
        system = [{"role": "system", "content": "Be brief."}, *CHAT]
        assert client.post("/v1/chat/completions", json={"messages": system, "max_tokens": 2}).status_code == 200
        # ... one the template cannot be given that way is its 400
        late = [*CHAT, {"role": "assistant", "content": "Heat it."}, {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "And then?"}]
        err = assert_error(client.post("/v1/chat/completions", json={"messages": late, "max_tokens": 2}), 400,
                           "messages")
        assert "System role not supported" in err["message"]
        assert_error(client.post("/tokenize", json={"messages": late}), 400, "messages")
        assert client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("value", ["Infinity", "1e999", "NaN", "-Infinity"])
def test_non_finite_repetition_penalty_is_a_400(client, value):
    # An infinite penalty turned zero logits into NaN: NaN logprobs were a 500 (JSON has no NaN) or, streamed,
    # `NaN` in a chunk that no JSON parser reads.
    body = f'{{"prompt": {list(range(300))}, "max_tokens": 2, "logprobs": 5, "repetition_penalty": {value}}}'
    assert_error(client.post("/v1/completions", content=body, headers=JSON), 400, "repetition_penalty")


@pytest.mark.parametrize("penalty", [1e30, 1e39])  # 1e39 is finite, but inf once cast to float32
def test_huge_repetition_penalty_gives_finite_logprobs(penalty):
    import math

    import torch

    from slimlm.serve.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.0, -1.0, -2.0, 0.5, -3.0])
    for temperature in (0, 1.0):
        sampler = Sampler(SamplingParams(temperature=temperature, repetition_penalty=penalty, logprobs=5, seed=0),
                          [0, 1, 2, 3, 4], 5)
        token, logprob, top = sampler(logits)
        values = [logprob] + [lp for _, lp in top]
        assert all(math.isfinite(v) and v >= -9999.0 for v in values), values  # no NaN, no -Infinity in JSON
        assert token in (0, 3)  # the two tokens the penalty leaves at (near) zero


class _SlowTokenizer:
    """Wraps a tokenizer; encoding a text with SLOW in it waits for `release` (a prompt of a few megabytes)."""

    def __init__(self, inner):
        import threading

        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def encode(self, text, **kw):
        if "SLOW" in text:
            self.entered.set()
            assert self.release.wait(60)
        return self.inner.encode(text, **kw)


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "SLOW", "max_tokens": 1}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}],
                                                                 "max_tokens": 1}),
                                       ("/tokenize", {"prompt": "SLOW"})])
def test_tokenizing_a_long_prompt_does_not_stall_other_requests(backend, tiny, path, body):
    import threading

    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    tok = _SlowTokenizer(tiny[1])
    app = create_app(ServeConfig(model="tiny", served_model_name="tiny"), backend=backend, tokenizer=tok)
    with TestClient(app) as client:
        slow, quick = [], []
        slow_thread = threading.Thread(target=lambda: slow.append(client.post(path, json=body)))
        slow_thread.start()
        try:
            assert tok.entered.wait(60)
            quick_thread = threading.Thread(target=lambda: quick.append(client.get("/health")))
            quick_thread.start()
            quick_thread.join(5)
            stalled = quick_thread.is_alive()  # the event loop was busy tokenizing
        finally:
            tok.release.set()
            slow_thread.join(60)
        quick_thread.join(60)
        assert not stalled and quick[0].status_code == 200
        assert slow[0].status_code == 200, slow[0].text


@pytest.mark.parametrize("path,body,param,expected", [
    ("/v1/completions", {"prompt": 5}, "prompt", "invalid value for prompt: expected a string, a list of strings"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "a list of token ids"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "invalid value for stop: expected a string or a list"),
    ("/v1/completions", {"max_tokens": 3}, "prompt", "prompt is required"),
    ("/v1/chat/completions", {"messages": [1]}, "messages", "invalid value for messages[0]: "),
])
def test_validation_messages_name_what_the_field_takes(client, path, body, param, expected):
    message = assert_error(client.post(path, json=body), 400, param)["message"]
    assert expected in message
    assert "list[" not in message and ".str" not in message  # pydantic's union member tags


def test_developer_message_is_the_system_message(client):
    def ids(role: str) -> list[int]:
        messages = [{"role": role, "content": "Answer briefly."}, *CHAT]
        return client.post("/tokenize", json={"messages": messages}).json()["tokens"]

    assert ids("developer") == ids("system")  # chat templates know no developer role


def test_top_p_zero_keeps_the_most_likely_token(client):
    # OpenAI accepts top_p=0 (clients send it with temperature 0 "to be deterministic"); it was a 400.
    req = {"prompt": "Once upon a time", "max_tokens": 8}
    greedy = client.post("/v1/completions", json={**req, "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (0, 1.0, 2.0):
        r = client.post("/v1/completions", json={**req, "temperature": temperature, "top_p": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy


def test_client_hanging_up_mid_body_is_not_an_error(make_server, caplog):
    import logging
    import socket
    import time
    from urllib.parse import urlparse

    caplog.set_level(logging.DEBUG, logger="slimlm.serve")
    url, _ = make_server()
    caplog.clear()  # the startup lines
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.2)
    records = []
    for _ in range(200):  # bounded wait for the server to notice
        records = [r for r in caplog.records if r.name == "slimlm.serve"]
        if records:
            break
        time.sleep(0.05)
    assert records and not any(r.levelno >= logging.ERROR for r in records), [r.getMessage() for r in records]


def test_disconnect_before_the_stream_body_starts_frees_the_sequence(backend, tiny):
    """The client hangs up while the stream's headers go out, before its body generator ever ran (whose `finally`
    aborted the sequence): the generation must still stop, not run to max_tokens."""
    import asyncio
    import json

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    app = create_app(ServeConfig(model="tiny", served_model_name="tiny", max_batch=1), backend=backend,
                     tokenizer=tiny[1])
    body = json.dumps({"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}).encode()

    async def scenario():
        headers_sent = asyncio.Event()
        sent = []
        request_read = False

        async def receive():
            nonlocal request_read
            if not request_read:
                request_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await headers_sent.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "http.response.start":
                headers_sent.set()
                await asyncio.sleep(0.5)  # a slow socket: the hang-up is seen while the headers are written

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        async with app.router.lifespan_context(app):
            state = app.state.slimlm
            await app(scope, receive, send)
            for _ in range(600):  # bounded wait for the sequence to end, one way or the other
                reasons = {r: state.metrics.registry.get_sample_value("slimlm_requests_total", {"finish_reason": r})
                           for r in ("abort", "length")}
                if any(reasons.values()):
                    break
                await asyncio.sleep(0.05)
        return sent, reasons, state.engine.steps

    sent, reasons, steps = asyncio.run(scenario())
    assert sent == ["http.response.start"]
    assert reasons["abort"] == 1 and not reasons["length"], f"the abandoned stream ran {steps} decode steps"


@pytest.mark.parametrize("n", [0, -2])
def test_n_below_one_says_so(client, n):
    message = assert_error(client.post("/v1/completions", json={"prompt": "x", "n": n}), 400, "n")["message"]
    assert message == f"n must be at least 1, got {n}"  # not "n > 1 is not supported"


class _Counted(str):
    """A str that counts the Python-level operations made on it (searches, comparisons, indexing, slicing)."""

    calls = 0


def _counting(name: str):
    def method(self, *args):
        _Counted.calls += 1
        return getattr(str, name)(self, *args)

    return method


for _name in ("find", "rfind", "index", "startswith", "endswith", "__getitem__", "__contains__"):
    setattr(_Counted, _name, _counting(_name))


def test_long_stop_strings_cost_little_per_token():
    from slimlm.serve.engine import _safe_end

    # _safe_end runs on the engine thread for every token of a request, delaying every other request's decode step:
    # its work must not grow with the length of the stop strings (slicing every prefix of a 40,000-character stop
    # string after 32,000 characters of output once cost 46 ms a token). Count the operations on the text and the
    # stop strings at two sizes 40x apart.
    def operations(n_text: int, n_stop: int, tail: str = "") -> tuple[int, int]:
        text, stops = _Counted("a" * n_text + tail), [_Counted("b" * n_stop) for _ in range(4)]
        _Counted.calls = 0
        end = _safe_end(text, stops)
        return end, _Counted.calls

    small, large = operations(800, 1_000), operations(32_000, 40_000)
    assert small[0] == 800 and large[0] == 32_000
    assert large[1] == small[1] <= 4 * 5, (small, large)  # a few operations per stop string, at any length
    held, large_tail = operations(32_000, 40_000, tail="bb")
    assert held == 32_000  # a tail that may begin a stop string is still held back
    assert large_tail == operations(800, 1_000, tail="bb")[1] <= 4 * 5
