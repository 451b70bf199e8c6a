"""The fused attention path of the ONNX export (onnxruntime's GroupQueryAttention and RotaryEmbedding) and the
MatMulNBits packing pass: same numbers as transformers' own attention, for every supported family."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from slimlm.export.onnx import DecoderWithPast, OnnxConfig, export_onnx, kv_shape
from slimlm.export.runtime import OnnxCausalLM
from slimlm.families import FAMILIES
from slimlm.testing import FAMILY_CONFIGS, save_tiny, tiny_model


def _batch():
    """Two prompts, the second left-padded by 3, and positions as the server makes them."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 63, 8, 21], [0, 0, 0, 11, 250, 31, 9, 77]])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", sorted(f for f in FAMILY_CONFIGS if FAMILIES[f].pre_norm_only))
def test_fused_decoder_matches_transformers_attention(family):
    model = tiny_model(family)
    model.config._attn_implementation = "sdpa"
    plain, fused = DecoderWithPast(model).eval(), DecoderWithPast(model, fused=True).eval()
    kv_heads, head_dim = kv_shape(model.config)
    ids, mask, pos = _batch()
    empty = [(torch.zeros(2, kv_heads, 0, head_dim),) * 2 for _ in plain.kv_layers]
    with torch.no_grad():
        ref, ref_past = plain(ids, mask, pos, empty)
        out, past = fused(ids, mask, pos, empty)
        real = mask.bool()
        assert (ref[real] - out[real]).abs().max() < 1e-4
        for (rk, rv), (k, v) in zip(ref_past, past):
            assert (rk[1, :, 3:] - k[1, :, 3:]).abs().max() < 1e-5 and (rv - v)[0].abs().max() < 1e-5
        nxt, mask2 = torch.tensor([[3], [4]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        ref2, _ = plain(nxt, mask2, pos[:, -1:] + 1, ref_past)
        out2, _ = fused(nxt, mask2, pos[:, -1:] + 1, past)
    assert (ref2 - out2).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_fused_export_of_other_families(family, tmp_path):
    """qwen3 normalizes q and k per head before the rotation; mistral is a plain GQA model: both export fused,
    validate (fp32: greedy tokens identical) and serve a left-padded batch like PyTorch."""
    import onnx

    src = save_tiny(tmp_path / "src", family=family)
    info = export_onnx(str(src), tmp_path / "onnx", OnnxConfig(weights="fp32"))["onnx"]
    assert info["attention"] == "fused" and info["validation"]["passed"] and info["validation"]["greedy_match"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == len(info["kv_layers"]) and "Softmax" not in ops
    runner = OnnxCausalLM(tmp_path / "onnx", threads=1)
    ids, mask, pos = _batch()
    logits, _ = runner.step(ids.numpy(), mask.numpy(), pos.numpy(), None)
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(input_ids=ids[1:, 3:]).logits[0]
    assert (logits[1, 3:] - ref).abs().max() < 1e-4


@pytest.mark.parametrize("family", sorted(f for f in FAMILY_CONFIGS if not FAMILIES[f].pre_norm_only))
def test_families_the_fused_path_cannot_take_say_why(family):
    from slimlm.export.attention import supported

    reason = supported(tiny_model(family, layers=2))
    assert reason is not None and family.split("_")[0] in reason


def test_plain_attention_still_exports(tiny_dir, tmp_path):
    import onnx

    info = export_onnx(str(tiny_dir), tmp_path / "plain", OnnxConfig(weights="fp32", attention="plain"))["onnx"]
    assert info["attention"] == "plain" and info["validation"]["greedy_match"] and info["max_positions"] is None
    ops = {n.op_type for n in onnx.load(str(tmp_path / "plain" / "model.onnx")).graph.node}
    assert "GroupQueryAttention" not in ops and "Softmax" in ops


def test_fp16_defaults_to_plain_attention():
    from slimlm.export.onnx import use_fused

    model = tiny_model("llama")
    assert not use_fused(model, OnnxConfig(weights="fp16"))
    assert use_fused(model, OnnxConfig(weights="fp16", attention="fused"))
    assert use_fused(model, OnnxConfig(weights="int4"))


def test_dynamic_rope_is_not_fused():
    from slimlm.errors import SlimlmError
    from slimlm.export.attention import supported
    from slimlm.export.onnx import use_fused

    model = tiny_model("llama")
    model.config.rope_parameters = {**(model.config.rope_parameters or {}), "rope_type": "dynamic", "factor": 2.0}
    assert "dynamic" in supported(model)
    assert not use_fused(model, OnnxConfig(weights="int4"))
    with pytest.raises(SlimlmError, match="fused attention is not available"):
        use_fused(model, OnnxConfig(weights="int4", attention="fused"))


def test_packing_is_exact(tmp_path):
    """Three weight MatMuls on one input, quantized by onnxruntime (4 and 8 bits), then packed: two packed nodes
    (one per width; the lone 8-bit one and the 4-bit pair), outputs identical to the bit."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    from slimlm.export.graph import pack_matmul_nbits

    rng = np.random.default_rng(0)
    k, widths = 64, [48, 32, 16, 40]
    weights = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}")
               for i, n in enumerate(widths)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(widths))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                               for i in range(len(widths))], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    quant = q.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, accuracy_level=4,
                                   algo_config=q.RTNWeightOnlyQuantConfig(
                                       customized_weight_config={"mm1": {"bits": 8}, "mm3": {"bits": 8}}))
    quant.process()
    unpacked = quant.model.model
    packed = onnx.ModelProto()
    packed.CopyFrom(unpacked)
    assert pack_matmul_nbits(packed) == 2
    ops = [n.op_type for n in packed.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 2
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
           for m in (unpacked, packed)]
    for a, b in zip(*run):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_fused_int8_export_records_passes(compressed_dir, tmp_path):
    info = export_onnx(str(compressed_dir), tmp_path / "int8", OnnxConfig(weights="int8"))["onnx"]
    saved = json.loads((tmp_path / "int8" / "slimlm.json").read_text())["onnx"]
    assert saved["fusions"]["rms_normalization"] >= 1 and saved["max_positions"] == 2048
    # every layer with attention: q, k, v packed into one node; every MLP (and the FFN replacement): gate and up
    n_attn, n_ffn = info["layers"]["attention"], info["layers"]["ffn"]
    assert saved["quantized_matmuls"]["packed_nodes"] == 2 * n_attn + n_ffn


def test_positions_past_the_rotary_table_are_refused(compressed_dir, tmp_path):
    export_onnx(str(compressed_dir), tmp_path / "o", OnnxConfig(weights="fp32", validate=False))
    runner = OnnxCausalLM(tmp_path / "o", threads=1)
    assert runner.max_positions == 2048
    with pytest.raises(ValueError, match="rotary table"):
        runner.step(np.array([[5]]), np.ones((1, 2049), np.int64), np.array([[2048]]), None)
    from slimlm.serve.onnx_backend import OnnxBackend

    assert OnnxBackend(runner).max_len == 2048
    runner.info["max_positions"] = 100  # a table shorter than the config's context caps the server's context
    assert OnnxBackend(runner).max_len == 100


def test_fused_graph_refuses_a_batch_chunk_over_a_past(compressed_dir, tmp_path):
    """onnxruntime's GroupQueryAttention takes T > 1 new tokens over a past only at batch 1: a clear error, not
    an onnxruntime failure; the plain graph takes it."""
    ids, mask, pos = _batch()
    for attention in ("fused", "plain"):
        export_onnx(str(compressed_dir), tmp_path / attention, OnnxConfig(weights="fp32", attention=attention,
                                                                          validate=False))
        runner = OnnxCausalLM(tmp_path / attention, threads=1)
        _, past = runner.step(ids[:, :4].numpy(), mask[:, :4].numpy(), pos[:, :4].numpy(), None)
        chunk = (ids[:, 4:].numpy(), mask.numpy(), pos[:, 4:].numpy(), past)
        if attention == "fused":
            with pytest.raises(ValueError, match="batch 1"):
                runner.step(*chunk)
        else:
            assert runner.step(*chunk)[0].shape[:2] == (2, 4)


def test_fused_decoder_takes_right_padding():
    """The PyTorch side of the fused op takes right padding as onnxruntime's does: a row's valid slots first, its
    new keys/values written right after them, its logits those of the row alone (prefill, then a decode step)."""
    model = tiny_model("llama")
    fused = DecoderWithPast(model, fused=True).eval()
    kv_heads, head_dim = kv_shape(model.config)
    rows = [[5, 17, 42, 99, 7, 63, 8, 21], [11, 250, 31, 9, 77]]
    ids = torch.tensor([rows[0], rows[1] + [0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    pos = torch.arange(8)[None].expand(2, 8)
    empty = [(torch.zeros(2, kv_heads, 0, head_dim),) * 2 for _ in fused.kv_layers]
    with torch.no_grad():
        out, past = fused(ids, mask, pos, empty)
        nxt = torch.tensor([[3], [4]])
        mask2 = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
        out2, present = fused(nxt, mask2, torch.tensor([[8], [5]]), past)
        for r, prompt in enumerate(rows):
            n = len(prompt)
            one = [(torch.zeros(1, kv_heads, 0, head_dim),) * 2 for _ in fused.kv_layers]
            ref, ref_past = fused(torch.tensor([prompt]), torch.ones(1, n, dtype=torch.long), torch.arange(n)[None],
                                  one)
            assert (out[r, :n] - ref[0]).abs().max() < 1e-5
            ref2, ref_present = fused(nxt[r:r + 1], torch.ones(1, n + 1, dtype=torch.long), torch.tensor([[n]]),
                                      ref_past)
            assert (out2[r] - ref2[0]).abs().max() < 1e-5
            assert (present[0][0][r, :, :n + 1] - ref_present[0][0][0]).abs().max() < 1e-6


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_rotary_and_packed_qkv_fold_into_attention(compressed_dir, tmp_path, monkeypatch, weights):
    """The export puts q/k's rotary (and, quantized, the Split of the packed q/k/v) into the GroupQueryAttention
    node: 3 nodes fewer a layer, and the logits of a prompt, a prompt over a past and a decode step are those of
    the unfolded graph, bit for bit."""
    import onnx

    import slimlm.export.graph as graph

    folded = export_onnx(str(compressed_dir), tmp_path / "folded", OnnxConfig(weights=weights, validate=False))
    n_attn = folded["onnx"]["layers"]["attention"]
    assert folded["onnx"]["fusions"]["rotary_into_attention"] == n_attn
    if weights == "int8":
        assert folded["onnx"]["quantized_matmuls"]["packed_attention"] == n_attn
    monkeypatch.setattr(graph, "fold_into_attention", lambda model: {"rotary": 0, "packed": 0})
    export_onnx(str(compressed_dir), tmp_path / "plain", OnnxConfig(weights=weights, validate=False))
    ops = {name: [n.op_type for n in onnx.load(str(tmp_path / name / "model.onnx"),
                                                 load_external_data=False).graph.node]
           for name in ("folded", "plain")}
    assert ops["folded"].count("RotaryEmbedding") == 0 and ops["plain"].count("RotaryEmbedding") == 2 * n_attn
    fewer = (3 if weights == "int8" else 2) * n_attn
    assert len(ops["plain"]) - len(ops["folded"]) == fewer
    runners = [OnnxCausalLM(tmp_path / name, threads=1) for name in ("folded", "plain")]
    assert runners[0].slot_positions and not runners[1].slot_positions
    prompt = np.array([[5, 17, 42, 99, 7, 63, 8, 21, 11, 250]])
    outs = []
    for lm in runners:
        first, past = lm.step(prompt[:, :6], np.ones((1, 6), np.int64), np.arange(6)[None], None)
        rest, past = lm.step(prompt[:, 6:], np.ones((1, 10), np.int64), np.arange(6, 10)[None], past)
        step, _ = lm.step(np.array([[3]]), np.ones((1, 11), np.int64), np.array([[10]]), past)
        outs.append((first, rest, step))
    for a, b in zip(*outs):
        assert torch.equal(a, b), (a - b).abs().max()
