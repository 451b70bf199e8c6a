"""slimlm.export: deploy a (compressed) model as bitsandbytes-quantized PyTorch or as ONNX for ONNX Runtime.

`quantize(spec, out, QuantConfig)` writes a bitsandbytes int8/nf4/fp4 Hugging Face directory;
`export_onnx(spec, out, OnnxConfig)` writes a decoder-with-KV-cache ONNX graph, validated against
PyTorch; `OnnxCausalLM(out)` runs it. Heavy modules load on first use.
"""

__all__ = ["OnnxCausalLM", "OnnxConfig", "QuantConfig", "export_onnx", "exported_with", "quantize"]

_WHERE = {"QuantConfig": "bnb", "quantize": "bnb", "OnnxConfig": "onnx", "export_onnx": "onnx",
          "exported_with": "onnx",
          "OnnxCausalLM": "runtime"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"slimlm.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'slimlm.export' has no attribute {name!r}")
