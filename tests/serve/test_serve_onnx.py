"""The ONNX Runtime backend, when the export package and onnxruntime are installed: served greedy text matches
the PyTorch backend's on the tiny model."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_backend_matches_torch(onnx_dir, make_client, backend, tiny):
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    cfg = ServeConfig(model=str(onnx_dir), backend="onnx", served_model_name="tiny", threads=1, max_model_len=256)
    onnx_backend, tok = load_backend(cfg)
    req = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    torch_text = make_client().post("/v1/completions", json=req).json()["choices"][0]["text"]
    with TestClient(create_app(cfg, backend=onnx_backend, tokenizer=tok)) as client:
        r = client.post("/v1/completions", json=req)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == torch_text
        assert client.get("/v1/models").json()["data"][0]["slimlm"]["backend"] == "onnx"
        chunks = client.post("/v1/completions", json={**req, "stream": True}).text
        assert chunks.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("variant", ["fp32", "int8", "plain"])
def test_onnx_batched_decode_equals_each_sequence_alone(onnx_variants, variant):
    """Three prompts of different lengths decoded as one batch (one joining late, one leaving early) give the
    logits each gives alone: bit for bit with the fused graphs (right padding: a row's arithmetic does not depend
    on its neighbours, so greedy output is batch-invariant, int8 activation rounding included); within rounding
    with the plain graph (left padding)."""
    import torch

    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    backend, _ = load_backend(ServeConfig(model=str(onnx_variants[variant]), backend="onnx", threads=1,
                                          max_model_len=256))
    assert backend.right == (variant != "plain")
    prompts = {0: [5, 9, 14, 30, 31, 40, 7], 1: [11, 12], 2: [50, 51, 52, 53]}

    def alone(ids, steps):
        backend.reset()
        rows = [backend.prefill(99, ids)]
        for _ in range(steps):
            rows.append(backend.decode([99], [int(rows[-1].argmax())])[0])
        return torch.stack(rows)

    want = {s: alone(ids, 6) for s, ids in prompts.items()}
    backend.reset()
    got = {s: [backend.prefill(s, prompts[s])] for s in (0, 1)}

    def step(live):
        out = backend.decode(live, [int(got[s][-1].argmax()) for s in live])
        for r, s in enumerate(live):
            got[s].append(out[r])

    for _ in range(2):
        step([0, 1])
    got[2] = [backend.prefill(2, prompts[2])]  # joins the running batch
    for _ in range(2):
        step([0, 1, 2])
    backend.release(1)  # leaves it
    for _ in range(2):
        step([0, 2])
    assert [len(got[s]) for s in prompts] == [7, 5, 5]
    for s in prompts:
        rows = torch.stack(got[s])
        if backend.right:
            assert torch.equal(rows, want[s][: len(rows)]), (s, (rows - want[s][: len(rows)]).abs().max())
        else:
            torch.testing.assert_close(rows, want[s][: len(rows)], rtol=1e-4, atol=1e-4)


def test_onnx_prompt_logprobs_match_torch(onnx_dir, make_client, monkeypatch):
    """echo with logprobs through ONNX Runtime scores the prompt as the PyTorch backend does."""
    from fastapi.testclient import TestClient

    from slimlm.serve import backends
    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    monkeypatch.setattr(backends, "SCORE_ROWS", 3)  # the prompt's rows in pieces
    cfg = ServeConfig(model=str(onnx_dir), backend="onnx", served_model_name="tiny", threads=1, max_model_len=256)
    onnx_backend, tok = backends.load_backend(cfg)
    req = {"prompt": "Once upon a time there was a river", "max_tokens": 0, "echo": True, "logprobs": 2}
    want = make_client().post("/v1/completions", json=req).json()["choices"][0]["logprobs"]
    with TestClient(create_app(cfg, backend=onnx_backend, tokenizer=tok)) as client:
        got = client.post("/v1/completions", json=req).json()["choices"][0]["logprobs"]
    assert got["tokens"] == want["tokens"] and len(got["tokens"]) > 3
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    diff = max(abs(a - b) for a, b in zip(got["token_logprobs"][1:], want["token_logprobs"][1:]))
    assert diff < 2e-2, diff  # the fp32 export's logit bar (1e-2, onnx_validate.TOLERANCES), twice: logit - logsumexp


def test_in_place_batch_cache_grows_and_decodes_as_the_stepped_one(onnx_variants, monkeypatch):
    """The fused graph's batch keeps its cache in place (buffers bound as past and present); when a row outgrows the
    buffers they are reallocated with the slots copied, and every logit equals the stepped path's bit for bit."""
    import torch

    import slimlm.serve.onnx_backend as onnx_backend
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    monkeypatch.setattr(onnx_backend, "IN_PLACE_HEADROOM", 4)
    backend, _ = load_backend(ServeConfig(model=str(onnx_variants["int8"]), backend="onnx", threads=1,
                                          max_model_len=256))
    assert backend.in_place
    prompts = {0: [5, 9, 14, 30, 31, 40, 7], 1: [11, 12]}

    def run(in_place):
        backend.in_place = in_place
        backend.reset()
        rows = {s: [backend.prefill(s, ids)] for s, ids in prompts.items()}
        capacities = []
        for _ in range(10):
            out = backend.decode([0, 1], [int(rows[s][-1].argmax()) for s in (0, 1)])
            for r, s in enumerate((0, 1)):
                rows[s].append(out[r])
            capacities.append(backend.cache.capacity if backend.cache is not None else None)
        return {s: torch.stack(v) for s, v in rows.items()}, capacities

    got, capacities = run(True)
    want, none = run(False)
    assert set(none) == {None} and len(set(capacities)) > 1  # the in-place buffers grew on the way
    for s in prompts:
        assert torch.equal(got[s], want[s])


@pytest.mark.parametrize("spare_core", [False, True])
def test_threads_on_every_core_stop_spinning_between_steps(onnx_dir, monkeypatch, spare_core):
    """onnxruntime's threads stop spinning after each step where they take every core (the engine and the HTTP
    thread need one between steps), and spin as usual where a core is left over."""
    import slimlm.env
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    monkeypatch.setattr(slimlm.env, "cores_available", lambda: 2 if spare_core else 1)
    backend, _ = load_backend(ServeConfig(model=str(onnx_dir), backend="onnx", threads=1, max_model_len=256))
    entries = backend.lm.session.get_session_options()
    if spare_core:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            entries.get_session_config_entry("session.force_spinning_stop")
    else:
        assert entries.get_session_config_entry("session.force_spinning_stop") == "1"
