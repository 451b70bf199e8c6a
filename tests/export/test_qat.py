"""Quantization-aware distillation before an int4 export (slimlm.export.qat): the grid it trains on is the grid
onnxruntime's round-to-nearest quantizer writes, and the export carries the trained weights block for block."""

import numpy as np
import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.export.onnx import OnnxConfig, export_onnx
from slimlm.export.qat import BlockFakeQuant, matrix_bits, quantization_aware

pytest.importorskip("onnxruntime")


def _ort_rtn(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """onnxruntime's own RTN block quantization of a torch-layout weight (out, in), dequantized."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor

    q, scale, zero = quant_tensor(w.astype(np.float32), num_bits=bits, group_size=block, scheme="asym")
    return ((q - zero) * scale).reshape(w.shape)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, 32), (4, 16)])
def test_fake_quant_is_onnxruntimes_rtn_grid(bits, block):
    g = torch.Generator().manual_seed(bits * block)
    w = torch.randn(24, 128, generator=g) * torch.logspace(-3, 0, 128)[None, :]  # blocks of very different ranges
    w[3, :block] = 0.5  # a constant block
    ours = BlockFakeQuant(block, bits)(w)
    torch.testing.assert_close(ours.double(), torch.from_numpy(_ort_rtn(w.numpy(), bits, block)), rtol=1e-5,
                               atol=1e-7)
    blocks = ours.reshape(24, -1, block)
    assert max(len(torch.unique(b)) for b in blocks.reshape(-1, block)) <= 2 ** bits
    torch.testing.assert_close(BlockFakeQuant(block, bits)(ours), ours)  # on the grid it stays there
    # the straight-through gradient reaches the latent weight unchanged
    w.requires_grad_(True)
    (BlockFakeQuant(block, bits)(w) * 3.0).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))


def test_matrix_bits_follow_the_export_rule(compressed_dir):
    model = slimlm.load_model(str(compressed_dir))[0]
    every4 = matrix_bits(model, 32, ("head",), "all")
    assert every4 and set(every4.values()) == {4}
    down8 = matrix_bits(model, 32, ("head", "down_proj"), "all")
    assert {k for k, b in down8.items() if b == 8} == {k for k in down8 if k.endswith("down_proj")}
    assert any(k.endswith("down_proj") for k in down8)
    from slimlm.export.onnx_quant import more_bits
    from slimlm.models import decoder_layers

    n = len(decoder_layers(model))
    mixed = matrix_bits(model, 32, ("down_proj",), "mixed")
    assert {k for k, b in mixed.items() if b == 8} == {
        k for k in mixed if k.endswith("down_proj") and more_bits(int(k.split(".")[0]), n)}
    assert matrix_bits(model, 256, ("head",), "all") == {}  # every matrix narrower than a block stays in float
    with pytest.raises(SlimlmError, match="not a multiple of the block size 48"):
        matrix_bits(model, 48, ("head",), "all")


def _dequantized(node, inits) -> np.ndarray:
    """A MatMulNBits node's weight as (N, K): the node itself run by onnxruntime on the identity (fp32 compute)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = attrs["K"], attrs["N"]
    attrs["accuracy_level"] = 0
    one = helper.make_node("MatMulNBits", ["x", *node.input[1:]], ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([one], "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
                              [inits[name] for name in node.input[1:] if name])
    m = helper.make_model(graph, ir_version=10,
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T


def test_round_to_nearest_export_carries_the_trained_weights(compressed_dir, tmp_path):
    """After quantization_aware the model's matrices sit on the grid, and the RTN int4 export writes exactly them:
    every 4-bit MatMulNBits of one matrix dequantizes to that matrix of the trained model."""
    import onnx

    model, tok = slimlm.load_model(str(compressed_dir))
    bits = matrix_bits(model, 32, ("head",), "all")
    record = quantization_aware(model, tok, bits, 32, minutes=0, steps=2, samples=6, seq_len=32, heldout=2,
                                progress=False)
    assert record["steps"] == 2 and record["matrices"] == {"int4": len(bits), "int8": 0}
    assert record["heldout_kl_after"] <= record["heldout_kl_before"]  # keep-best: never worse than plain rounding
    out = tmp_path / "rtn"
    export_onnx(None, out, OnnxConfig(weights="int4", int4_method="rtn", int4_keep8=("head",)), model=model,
                tokenizer=tok)
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [m.weight.detach().numpy() for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.weight.shape[0] != model.config.vocab_size]
    checked = 0
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.output[0].endswith("_packed"):
            continue
        if {a.name: a.i for a in node.attribute}["bits"] != 4:
            continue
        w = _dequantized(node, inits)
        same = [x for x in weights if x.shape == w.shape and np.abs(x - w).max() < 1e-5]
        assert len(same) >= 1, node.name
        checked += 1
    assert checked >= 2


def test_export_with_qat(compressed_dir, tmp_path):
    cfg = OnnxConfig(weights="int4", qat_steps=2)
    assert cfg.int4_method == "rtn" and cfg.int4_keep8 == ("head",)
    report = export_onnx(str(compressed_dir), tmp_path / "qat", cfg)["onnx"]
    qat = report["qat"]
    assert qat["steps"] == 2 and qat["heldout_kl_after"] <= qat["heldout_kl_before"]
    assert report["validation"]["passed"]
    assert report["quantized_matmuls"]["int8_nodes"] == 1  # the head alone
    # the plain int4 export's checks against PyTorch: the QAT export matches its own (quantized) PyTorch model closer
    plain = export_onnx(str(compressed_dir), tmp_path / "plain", OnnxConfig(weights="int4", int4_method="rtn",
                                                                            int4_keep8=("head",)))["onnx"]
    cos = [c["cosine"] for c in report["validation"]["checks"]]
    plain_cos = [c["cosine"] for c in plain["validation"]["checks"]]
    assert min(cos) > min(plain_cos)


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "int8", "qat_minutes": 1}, "for --weights int4"),
    ({"weights": "int4", "qat_steps": 0}, "at least 1"),
    ({"weights": "int4", "qat_minutes": -1}, "qat-minutes"),
    ({"weights": "int4", "qat_steps": 3, "int4_method": "kquant"}, "round to nearest"),
])
def test_qat_config_errors(kwargs, match):
    with pytest.raises(SlimlmError, match=match):
        OnnxConfig(**kwargs)


def test_an_odd_block_count_is_refused_before_any_work(tiny_dir, tmp_path):
    """onnxruntime's 4-bit quantizer cannot pack the zero points of an odd number of blocks a row (it failed deep
    inside with a reshape error); the export says so in one line, before quantization-aware training starts."""
    with pytest.raises(SlimlmError, match="64 inputs, 1 blocks a row.*use 16 or 32"):
        export_onnx(str(tiny_dir), tmp_path / "odd", OnnxConfig(weights="int4", block_size=64, qat_steps=1))
    assert not (tmp_path / "odd").exists()
