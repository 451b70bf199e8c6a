"""`import slimlm` and the CLI's modules stay light: what a stage needs loads when it runs, not before."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("code, heavy", [
    ("import slimlm, slimlm.cli; slimlm.load_model",
     ("triton", "onnxruntime", "bitsandbytes", "fastapi", "onnx")),
    ("import slimlm, slimlm.export, slimlm.export.cli; from slimlm.cli import build_parser; build_parser()",
     ("onnxruntime", "onnx", "bitsandbytes", "onnxscript")),
    ("import slimlm, slimlm.kernels, slimlm.kernels.ffn, slimlm.kernels.bench; "
     "from slimlm.kernels.ffn import FusedFFN; FusedFFN(8, 16)(__import__('torch').randn(2, 8))",
     ("triton",)),
    ("import slimlm, slimlm.serve.cli, slimlm.serve.config",
     ("fastapi", "uvicorn", "prometheus_client", "torch")),
], ids=["core", "export", "kernels", "serve"])
def test_import_is_lean(code, heavy):
    probe = f"{code}; import sys; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_compress_is_the_package_and_the_function():
    """`slimlm.compress` is callable and its names load on first use, by the one lazy-import rule."""
    code = ("import sys, slimlm; import slimlm.compress.config; c = slimlm.compress; "
            "assert callable(c) and c.__name__ == 'slimlm.compress', c; "
            "assert 'slimlm.compress.run' not in sys.modules; "
            "from slimlm.compress import compress; from slimlm.compress.run import compress as f; "
            "assert compress is f; from slimlm.export import OnnxConfig; "
            "from slimlm.export.onnx import OnnxConfig as g; assert OnnxConfig is g")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
