"""Against a real uvicorn on 127.0.0.1: the official `openai` client, continuous batching of concurrent
HTTP requests, 429 when full, and a disconnecting client freeing its slot."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")

WAIT_S = 120
PROMPTS = [f"Question {i}: how do you boil water? " * (1 + i % 3) for i in range(8)]


def client_for(url: str, key: str = "unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=WAIT_S)


def test_openai_client(make_server):
    url, _ = make_server(api_key="k-123")
    client = client_for(url, "k-123")
    assert [m.id for m in client.models.list()] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6
    assert c.model_extra["timings"]["ttft_ms"] >= 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == c.choices[0].text
    with pytest.raises(openai.AuthenticationError):
        client_for(url, "wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)


def test_concurrent_equals_sequential(make_server):
    url, app = make_server(max_batch=8)
    client = client_for(url)

    def one(prompt: str) -> str:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        return r.choices[0].text

    sequential = [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, PROMPTS))
    assert concurrent == sequential
    assert app.state.slimlm.engine.max_batch_seen > 1, "the concurrent requests never shared a decode step"


def _open_stream(http: httpx.Client, max_tokens: int = 1500):
    """Start a long streamed completion and return (response context, line iterator) after its first chunk."""
    ctx = http.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": max_tokens,
                                                        "temperature": 0, "stream": True})
    response = ctx.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line)
    assert first.startswith("data: ")
    return ctx, lines


def test_queue_full_429(make_server):
    url, app = make_server(max_batch=1, max_queue=0)
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        ctx, lines = _open_stream(http, max_tokens=300)
        try:
            r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 429
            assert r.headers["retry-after"].isdigit()
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            rest = [line for line in lines if line]
        finally:
            ctx.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    assert app.state.slimlm.engine.wait_idle(WAIT_S)
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnect_frees_slot(make_server):
    url, app = make_server(max_batch=1, max_queue=0)
    engine = app.state.slimlm.engine
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        ctx, _ = _open_stream(http, max_tokens=2000)
        ctx.__exit__(None, None, None)  # hang up mid-stream
    assert engine.wait_idle(WAIT_S)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'slimlm_requests_total{finish_reason="abort"} 1.0' in metrics
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200  # the single slot is free again


def test_non_stream_disconnect_frees_slot(make_server):
    url, app = make_server(max_batch=1, max_queue=0)
    engine = app.state.slimlm.engine
    with httpx.Client(base_url=url, timeout=httpx.Timeout(0.2, connect=30)) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2000, "temperature": 0})
    assert engine.wait_idle(WAIT_S)
    assert 'slimlm_requests_total{finish_reason="abort"} 1.0' in httpx.get(f"{url}/metrics").text


def test_bench_against_live_server(make_server, capsys):
    from slimlm.serve.bench import main

    url, _ = make_server(max_batch=4)
    rc = main([url, "--concurrency", "1,2", "--requests", "2", "--max-tokens", "5", "--warmup", "1",
               "--endpoint", "completions", "--model", "tiny"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert rc == 0
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["completed"] == 2 and row["output_tokens"] == 10
        # the figures are consistent with each other (their size is the benchmark's business, not a test's)
        assert row["output_tokens_per_s"] == pytest.approx(row["output_tokens"] / row["duration_s"], rel=0.05)
        assert row["ttft_p50_ms"] <= row["e2e_p50_ms"]  # each request's first token comes within it
    assert result["servers"][url]["id"] == "tiny"
