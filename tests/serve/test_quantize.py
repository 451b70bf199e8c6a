"""`--quantize int8` goes through `slimlm.export.quantize` (bitsandbytes) once, into the cache, and serves."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")


def test_quantized_backend_serves(serve_tiny_dir, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    cfg = ServeConfig(model=str(serve_tiny_dir), quantize="int8", threads=1, served_model_name="tiny")
    try:
        backend, tok = load_backend(cfg)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"no quantization here: {exc}")
    assert list((tmp_path / "cache" / "serve-quantized").iterdir()), "the quantized model was not cached"
    with TestClient(create_app(cfg, backend=backend, tokenizer=tok)) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        assert client.get("/v1/models").json()["data"][0]["slimlm"]["quantize"] == "int8"
