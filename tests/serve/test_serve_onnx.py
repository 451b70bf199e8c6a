"""The ONNX Runtime backend, when the export package and onnxruntime are installed: served greedy text matches
the PyTorch backend's on the tiny model."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_dir(serve_tiny_dir, tmp_path_factory):
    try:
        from slimlm.export import OnnxConfig, export_onnx
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"slimlm.export has no ONNX export here: {exc}")
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    export_onnx(str(serve_tiny_dir), out, OnnxConfig())
    return out


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
