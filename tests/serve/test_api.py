"""The HTTP API through FastAPI's test client: wire format, streaming, usage and timings, errors, auth,
tokenizer routes, health while loading, and Prometheus metrics."""

from __future__ import annotations

import json
import threading

import pytest

CHAT = [{"role": "user", "content": "How do you boil water?"}]


def sse_events(text: str) -> list:
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    out = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out.count("[DONE]") == 1 and out[-1] == "[DONE]"
    return out[:-1]


def assert_error(r, status: int, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_completion(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    n_prompt = client.post("/tokenize", json={"prompt": "Hello"}).json()["count"]
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7}
    t = body["timings"]
    for key in ("queue_ms", "ttft_ms", "prefill_ms", "decode_ms_per_token", "tokens_per_second", "peak_memory_mb"):
        assert t[key] is not None and t[key] >= 0, key
    assert t["ttft_ms"] >= t["queue_ms"]
    timing = r.headers["server-timing"]
    assert "ttft;dur=" in timing and "total;dur=" in timing


def test_chat(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_completion_tokens": 5,
                                                  "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert body["usage"]["completion_tokens"] == 5
    n_prompt = client.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert body["usage"]["prompt_tokens"] == n_prompt


def test_stream_matches_non_stream(client):
    req = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "ttft;dur=" in r.headers["server-timing"]
    events = sse_events(r.text)
    *chunks, usage_chunk = events
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert usage_chunk["timings"]["completion_tokens"] == 12
    assert "timings" in chunks[-1]


def test_chat_stream(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 6,
                                                  "temperature": 0, "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["delta"] == {}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    whole = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 6,
                                                      "temperature": 0}).json()
    assert text == whole["choices"][0]["message"]["content"]


def test_logprobs(client):
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])  # greedy picks the top one
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3


def test_seed_and_stop(client, pick_stop):
    req = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 1.0, "seed": 7}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    c = client.post("/v1/completions", json={**req, "seed": 8}).json()["choices"][0]["text"]
    assert a == b and a != c
    stop = pick_stop(a)
    cut = client.post("/v1/completions", json={**req, "stop": stop}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == a[:a.index(stop)]
    r = client.post("/v1/completions", json={**req, "stop": [stop], "stream": True})
    streamed = "".join(e["choices"][0]["text"] for e in sse_events(r.text))
    assert streamed == cut["text"]


BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    # features that would change the answer, which the server does not implement: refused, not ignored
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": -100}}, "logit_bias"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{q}" for p, _, q in BAD])
def test_bad_input_400(client, path, body, param):
    err = assert_error(client.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_harmless_defaults_of_unsupported_fields_are_accepted(client):
    body = {"messages": CHAT, "max_tokens": 2, "logit_bias": {}, "tools": [], "tool_choice": "auto",
            "response_format": {"type": "text"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("body,param", [('{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
                                        ('{"prompt": "x", "stop": ["\\udfff"]}', "stop")])
def test_unpaired_surrogate_is_a_400_not_a_crash(client, body, param):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert "Unicode" in assert_error(r, 400, param)["message"]


def test_unpaired_surrogate_in_tokenize_is_a_400(client):
    r = client.post("/tokenize", content='{"prompt": "\\ud800"}', headers={"content-type": "application/json"})
    assert "Unicode" in assert_error(r, 400, "prompt")["message"]


def test_context_length_400_names_both_numbers(client):
    n = client.post("/tokenize", json={"prompt": "Hello there"}).json()["count"]
    err = assert_error(client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 250}), 400,
                       "max_tokens")
    assert "256" in err["message"] and str(n) in err["message"] and "250" in err["message"]
    assert_error(client.post("/v1/completions", json={"prompt": "word " * 400}), 400)


def test_not_json_and_not_object(client):
    assert_error(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400)
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)


def test_404s(client):
    err = assert_error(client.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"}), 404, "model")
    assert err["code"] == "model_not_found"
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/models/gpt-5"), 404)
    assert client.get("/v1/models/tiny").status_code == 200


def test_413(make_client):
    client = make_client(max_body_bytes=1000)
    assert_error(client.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_auth(make_client):
    client = make_client(api_key="s3cret-key")
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
        err = assert_error(client.get("/v1/models", headers=headers), 401)
        assert "s3cret" not in err["message"]
    assert_error(client.post("/v1/completions", json={"prompt": "x"}), 401)
    assert_error(client.get("/metrics"), 401)
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200


def test_models(client):
    data = client.get("/v1/models").json()["data"]
    assert len(data) == 1
    card = data[0]
    assert card["id"] == "tiny" and card["max_model_len"] == 256 and card["context_length"] == 256
    info = card["slimlm"]
    assert info["layers"] == 4 and info["ffn_paths"] == [] and info["size_bytes"] > 0


def test_tokenize_roundtrip(client):
    ids = client.post("/tokenize", json={"prompt": "boil water"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "boil water"
    assert_error(client.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens")
    assert_error(client.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")


def test_metrics_parse_and_move(client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = client.get("/metrics")
        assert r.status_code == 200
        out = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = scrape()
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    after = scrape()
    assert after[("slimlm_generation_tokens_total", ())] - before[("slimlm_generation_tokens_total", ())] == 4
    assert after[("slimlm_prompt_tokens_total", ())] > before[("slimlm_prompt_tokens_total", ())]
    key = ("slimlm_requests_total", (("finish_reason", "length"),))
    assert after[key] - before[key] == 1
    assert after[("slimlm_time_to_first_token_seconds_count", ())] == before[
        ("slimlm_time_to_first_token_seconds_count", ())] + 1
    itl = ("slimlm_inter_token_latency_seconds_count", ())
    assert after[itl] - before[itl] == 3  # one gap between each pair of the 4 tokens
    for name in ("slimlm_process_resident_memory_bytes", "slimlm_process_peak_memory_bytes",
                 "slimlm_model_size_bytes"):
        assert after[(name, ())] > 0, name
    assert ("slimlm_requests_running", ()) in after and ("slimlm_requests_waiting", ()) in after
    assert ("slimlm_e2e_request_latency_seconds_count", ()) in after
    assert ("slimlm_request_queue_time_seconds_count", ()) in after


def test_health_503_while_loading(monkeypatch, backend, tiny):
    from fastapi.testclient import TestClient

    from slimlm.serve import backends
    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    release = threading.Event()

    def slow_load(config):
        assert release.wait(60)
        return backend, tiny[1]

    monkeypatch.setattr(backends, "load_backend", slow_load)
    with TestClient(create_app(ServeConfig(model="tiny"))) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503)
        release.set()
        state = client.app.state.slimlm
        for _ in range(600):  # bounded: the loader thread only has to return
            if state.engine is not None:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").status_code == 200


def test_load_error_reported(tmp_path):
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    app = create_app(ServeConfig(model=str(tmp_path / "missing")))
    state = app.state.slimlm
    state.load()  # what the lifespan thread runs, here in the foreground
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        err = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503)
        assert "failed to load" in err["message"]


class _FailingBackend:
    """Wraps a backend; decode raises after `ok_steps` steps (a generation failing mid-stream)."""

    def __init__(self, inner, ok_steps: int):
        self.inner, self.ok_steps, self.steps = inner, ok_steps, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, seq_ids, tokens):
        self.steps += 1
        if self.steps > self.ok_steps:
            raise RuntimeError("simulated device failure")
        return self.inner.decode(seq_ids, tokens)


def test_error_mid_stream(backend, tiny):
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    app = create_app(ServeConfig(model="tiny"), backend=_FailingBackend(backend, ok_steps=3), tokenizer=tiny[1])
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "temperature": 0,
                                                 "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert "error" in events[-1] and set(events[-1]["error"]) == {"message", "type", "param", "code"}
        assert "simulated device failure" in events[-1]["error"]["message"]
        assert len(events) > 1 and all("choices" in e for e in events[:-1])
        err = assert_error(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20}), 500)
        assert "Traceback" not in err["message"]


def test_models_show_what_compress_did(serve_tiny_dir, calib_file, tmp_path):
    """The model card names the compression method, the replacement and the removed layers that `slimlm compress`
    recorded in slimlm.json (it once read keys the record does not have, and showed no method)."""
    from fastapi.testclient import TestClient

    import slimlm
    from slimlm.compress import CompressConfig
    from slimlm.models import load_model
    from slimlm.serve.app import create_app
    from slimlm.serve.backends import TorchBackend
    from slimlm.serve.config import ServeConfig

    model, tok = load_model(str(serve_tiny_dir))
    config = CompressConfig(method="shortgpt", replacement="none", layers=1, calib=str(calib_file), calib_samples=8,
                            seq_len=32, heldout=2, progress=False)
    out = slimlm.compress(model, config, tokenizer=tok).save(tmp_path / "compressed")
    report = json.loads((out / "slimlm.json").read_text())
    model, tok = load_model(str(out))
    app = create_app(ServeConfig(model="tiny"), backend=TorchBackend(model, tok, max_len=64), tokenizer=tok)
    with TestClient(app) as client:
        compressed = client.get("/v1/models").json()["data"][0]["slimlm"]["compressed"]
    assert compressed == {"method": "shortgpt", "replacement": "none",
                          "removed_layers": report["selection"]["removed_layers"],
                          "layers_before": report["layers_before"], "layers_after": report["layers_after"],
                          "params_before": report["params_before"], "params_after": report["params_after"]}
    assert report["params_after"] < report["params_before"] and report["layers_after"] == report["layers_before"] - 1


def _without_none(value):
    """A JSON schema as the OpenAPI document carries it: FastAPI leaves out null values (`"default": null`)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def test_openapi_spec_lists_every_route_with_its_request_schema(make_client):
    from slimlm.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

    client = make_client(api_key="s3cret-key")
    assert_error(client.get("/openapi.json"), 401)
    assert_error(client.get("/docs"), 401)
    key = {"Authorization": "Bearer s3cret-key"}
    assert client.get("/docs", headers=key).status_code == 200
    spec = client.get("/openapi.json", headers=key).json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = {(route.path_format, method) for route in client.app.routes if getattr(route, "include_in_schema", False)
              for method in route.methods - {"HEAD"}}
    assert documented == served and ("/v1/completions", "POST") in served and len(served) == 8
    bodies = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
              "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method == "post":
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                assert schema == _without_none(bodies[path].model_json_schema()), path
            else:
                assert "requestBody" not in op, path
            assert ("security" in op) == (path != "/health"), path
    assert spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "required"] == ["prompt"]
    assert "messages" in bodies["/v1/chat/completions"].model_json_schema()["required"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # the documented body is not validated by FastAPI on the way in: strict validation, OpenAI's error shape
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "5"}, headers=key), 400,
                       "max_tokens")
    assert err["message"].startswith("invalid value for max_tokens")


def test_openapi_spec_is_open_without_a_key(client):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/chat/completions" in spec.json()["paths"]
    assert "securitySchemes" not in spec.json().get("components", {})
