"""Fixtures for the export tests: a tiny dense model (tests/conftest.py) and its 2-layer FFN compression."""

import pytest


@pytest.fixture(scope="session")
def compressed_dir(tiny_dir, tmp_path_factory):
    """The tiny model with layers 2-3 replaced by one FFN (streamline+ffn), saved as compress saves it."""
    import slimlm
    from slimlm.compress import CompressConfig

    model, tok = slimlm.load_model(str(tiny_dir))
    cfg = CompressConfig(layers=2, calib_samples=8, seq_len=32, epochs=1, progress=False)
    out = tmp_path_factory.mktemp("compressed") / "ffn"
    slimlm.compress(model, cfg, tokenizer=tok).save(out)
    return out


@pytest.fixture(scope="session", params=["dense", "compressed"])
def model_dir(request):
    """Each tiny model in turn: dense, then compressed."""
    return request.getfixturevalue("tiny_dir" if request.param == "dense" else "compressed_dir")


@pytest.fixture(scope="session")
def token_ids():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 320, (2, 12), generator=g)


@pytest.fixture(scope="session")
def onnx_fp32(model_dir, tmp_path_factory):
    """fp32 ONNX export (validated) of each tiny model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slimlm.export.onnx import OnnxConfig, export_onnx

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_onnx(str(model_dir), out, OnnxConfig(weights="fp32"))
    return out
