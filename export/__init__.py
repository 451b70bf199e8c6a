"""slimlm.export: deploy a (compressed) model as bitsandbytes-quantized PyTorch or as ONNX for ONNX Runtime.

`quantize(spec, out, QuantConfig)` writes a bitsandbytes int8/nf4/fp4 Hugging Face directory;
`export_onnx(spec, out, OnnxConfig)` writes a decoder-with-KV-cache ONNX graph, validated against
PyTorch; `OnnxCausalLM(out)` runs it. Heavy modules load on first use.
"""

__all__ = ["OnnxCausalLM", "OnnxConfig", "QuantConfig", "export_onnx", "exported_with", "quantize"]

from slimlm import lazy_getattr

__getattr__ = lazy_getattr(__name__, {
    "QuantConfig": "slimlm.export.bnb", "quantize": "slimlm.export.bnb", "OnnxConfig": "slimlm.export.onnx",
    "export_onnx": "slimlm.export.onnx", "exported_with": "slimlm.export.onnx", "OnnxCausalLM": "slimlm.export.runtime",
})
