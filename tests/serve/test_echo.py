"""Prompt logprobs with `echo` on /v1/completions, as lm-evaluation-harness (`--model local-completions`) asks for
them to score log-likelihood tasks: the served score of a continuation equals `slimlm eval`'s, the block covers the
prompt's tokens, `max_tokens: 0` returns the prompt alone, and streams carry the same."""

from __future__ import annotations

import json

import pytest

PAIRS = [("The river flows under the", " old city bridge"), ("Music and science are", " always people"),
         ("Question: where is the small river?\nAnswer:", " under the large hill")]


def _whole_and_ctx(tok, ctx: str, cont: str) -> tuple[list[int], int]:
    """The token ids of context + continuation and the context's share of them, split as slimlm.evaluate does."""
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(ctx_ids)
    while n_ctx > 0 and whole[:n_ctx] != ctx_ids[:n_ctx]:
        n_ctx -= 1
    assert 0 < n_ctx < len(whole)
    return whole, n_ctx


@pytest.mark.parametrize("score_rows", [3, 512])  # the prompt's logits through the head in pieces, or at once
@pytest.mark.parametrize("max_tokens", [0, 1])  # lm-evaluation-harness sends either
def test_served_loglikelihood_equals_evaluate(client, tiny, monkeypatch, score_rows, max_tokens):
    from slimlm.evaluate import _loglikelihoods
    from slimlm.serve import backends

    monkeypatch.setattr(backends, "SCORE_ROWS", score_rows)
    model, tok = tiny
    want = _loglikelihoods(model, tok, PAIRS, batch_size=2, progress=False, desc="pairs")
    for (ctx, cont), expected in zip(PAIRS, want):
        whole, n_ctx = _whole_and_ctx(tok, ctx, cont)
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": [whole], "echo": True, "logprobs": 1,
                                                 "max_tokens": max_tokens, "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(whole) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
        # what lm-evaluation-harness sums: the continuation's tokens, without the generated one
        served = sum(lp["token_logprobs"][n_ctx:len(whole)])
        assert served == pytest.approx(expected, rel=1e-5, abs=1e-4), (ctx, cont)
        for token_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert len(top) == 1 and token_lp <= max(top.values()) + 1e-6  # its greedy check reads these
        assert choice["text"].startswith(tok.decode(whole))
        assert lp["text_offset"][0] == 0
        assert lp["text_offset"] == sorted(lp["text_offset"])
        assert r.json()["usage"]["completion_tokens"] == max_tokens


def test_echo_prepends_the_prompt(client):
    req = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=req).json()["choices"][0]
    echoed = client.post("/v1/completions", json={**req, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "Once upon a time" + plain["text"] and echoed["logprobs"] is None
    with_lp = client.post("/v1/completions", json={**req, "echo": True, "logprobs": 2}).json()["choices"][0]
    n_prompt = client.post("/tokenize", json={"prompt": "Once upon a time"}).json()["count"]
    lp = with_lp["logprobs"]
    assert with_lp["text"] == echoed["text"] and len(lp["tokens"]) == n_prompt + 5
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    generated = client.post("/v1/completions", json={**req, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert lp["tokens"][n_prompt:] == generated["tokens"]
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(generated["token_logprobs"])


def test_echo_with_no_completion(client):
    r = client.post("/v1/completions", json={"prompt": "Hello there", "echo": True, "max_tokens": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "Hello there" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    full = [7] * 256  # the whole context: nothing left to generate, nothing asked for
    assert client.post("/v1/completions", json={"prompt": full, "echo": True, "max_tokens": 0,
                                                "logprobs": 0}).status_code == 200
    r = client.post("/v1/completions", json={"prompt": full + [7], "echo": True, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    for body in ({"prompt": "x", "max_tokens": 0}, {"prompt": "x", "echo": True, "max_tokens": -1}):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "at least 0" in r.json()["error"]["message"]


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_echo_stream_matches_the_whole_response(client, max_tokens):
    req = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "echo": True, "logprobs": 1}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    r = client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(block[len("data: "):]) for block in r.text.split("\n\n")[:-2]]
    first = chunks[0]["choices"][0]
    assert first["text"] == "Once upon a time" and first["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
