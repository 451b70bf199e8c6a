"""ONNX export of tiny dense and compressed models: graph contract, parity with PyTorch at past lengths 0/1/7,
int8/int4 weights, generation through OnnxCausalLM, CLI errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import slimlm
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.export import onnx as export_mod
from slimlm.export import onnx_validate
from slimlm.export.onnx import DEFAULT_BLOCK, DEFAULT_HEAD_BLOCK, OnnxConfig, export_onnx
from slimlm.export.runtime import OnnxCausalLM
from slimlm.models import FFNLayer

# Quantized graphs vs the fp32 PyTorch model, on random tiny models (mean cosine over positions): measured
# ~0.9999 (int8) and ~0.99 (int4 HQQ, block 32); the bars leave a margin and still catch a wrong scale or a
# mangled layer (which gives cosine near 0).
QUANT_BARS = {"int8": (0.99, 0.9), "int4": (0.95, 0.75)}  # (min cosine, min top-1 agreement)


def _torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt):].tolist()


def test_graph_contract(onnx_fp32, model_dir):
    import onnx

    info = json.loads((onnx_fp32 / "slimlm.json").read_text())["onnx"]
    model, _ = slimlm.load_model(str(model_dir))
    ffn = [i for i, layer in enumerate(model.model.layers) if isinstance(layer, FFNLayer)]
    assert info["ffn_layers"] == ffn and len(info["kv_layers"]) + len(ffn) == len(model.model.layers)
    graph = onnx.load(str(onnx_fp32 / "model.onnx"), load_external_data=False).graph
    n = len(info["kv_layers"])
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{j}.{k}" for j in range(n) for k in ("key", "value")] + ["logits_to_keep"]
    assert "logits_to_keep" in {t.name for t in graph.initializer}  # optional: its default keeps every position
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{j}.{k}" for j in range(n) for k in ("key", "value")]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"][0::2] == ["batch_size", "past_sequence_length"]
    assert dims["present.0.key"][0::2] == ["batch_size", "total_sequence_length"]
    assert dims["logits"][:2] == ["batch_size", "logits_length"]
    for name in ("config.json", "tokenizer.json"):
        assert (onnx_fp32 / name).is_file()


def test_logits_of_the_last_positions_only(onnx_fp32):
    """`last` (the graph's logits_to_keep) gives exactly the last rows of the full logits and the same cache; by
    default every position has logits (validation, perplexity and prompt scoring read them all)."""
    lm = OnnxCausalLM(onnx_fp32, threads=1)
    assert lm.keeps_logits
    ids, mask, pos = np.array([[5, 17, 42, 99, 7, 63]]), np.ones((1, 6), np.int64), np.arange(6)[None]
    full, present = lm.step(ids, mask, pos)
    assert full.shape[1] == 6
    for last in (1, 2, 6, 100):
        logits, kept_present = lm.step(ids, mask, pos, last=last)
        assert torch.equal(logits, full[:, -min(last, 6):])
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(present, kept_present))
    with pytest.raises(ValueError):
        lm.step(ids, mask, pos, last=0)


def test_fp32_parity_recorded(onnx_fp32):
    v = json.loads((onnx_fp32 / "slimlm.json").read_text())["onnx"]["validation"]
    assert v["passed"] and v["greedy_match"]
    assert [c["past_len"] for c in v["checks"]] == [0, 1, 7, 32]
    for c in v["checks"]:
        assert c["max_abs_diff"] <= v["tolerance"]["max_abs_diff"] and c["top1_agreement"] == 1.0


def test_generate_matches_torch_greedy(onnx_fp32, model_dir):
    model, tok = slimlm.load_model(str(model_dir))
    runner = OnnxCausalLM(onnx_fp32, threads=1)
    prompt = tok("Once upon a time there was", add_special_tokens=False)["input_ids"]
    want = _torch_greedy(model, prompt, 16)
    assert runner.generate(prompt, 16, stop_at_eos=False) == want
    assert runner.generate(prompt, 16, stop_at_eos=False, share_buffer=False) == want


def test_in_place_cache_decodes_as_the_stepped_cache(onnx_fp32, monkeypatch):
    """The fused graph's batch-1 decode with its cache in preallocated buffers (written in place by the graph)
    gives the logits and the cache of decoding step by step with a growing cache."""
    from slimlm.export import runtime

    runner = OnnxCausalLM(onnx_fp32, threads=1)
    assert runner.fused and runner.shares_buffer(40) and not runner.shares_buffer(runner.max_positions + 1)
    made = []
    monkeypatch.setattr(runtime.InPlaceCache, "__init__", _record(runtime.InPlaceCache.__init__, made))
    prompt = np.array([[5, 17, 42, 99]])
    n = prompt.shape[1]
    logits, past = runner.step(prompt, np.ones((1, n), np.int64), np.arange(n)[None], None)
    cache = runtime.InPlaceCache(runner, past, n + 6)
    token = int(logits[0, -1].argmax())
    for _ in range(5):
        n += 1
        mask = np.zeros((1, cache.capacity), np.int64)
        mask[0, :n] = 1
        got = cache.run(np.array([[token]]), mask, np.array([[n - 1]]))
        logits, past = runner.step(np.array([[token]]), np.ones((1, n), np.int64), np.array([[n - 1]]), past)
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
        token = int(logits[0, -1].argmax())
    for buf, cached in zip([b for pair in cache.arrays for b in pair], [kv for pair in past for kv in pair]):
        np.testing.assert_allclose(buf[:, :, :n], cached, rtol=1e-5, atol=1e-5)
        assert not buf[:, :, n:].any()  # the rest of the buffer untouched
    made.clear()
    one = runner.generate([5, 17, 42], 8, do_sample=True, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    assert len(made) == 1  # generate took the in-place path
    assert one == runner.generate([5, 17, 42], 8, do_sample=True, temperature=1.0, top_p=0.9, seed=3,
                                  stop_at_eos=False, share_buffer=False)


def _record(init, made):
    def wrapped(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    return wrapped


def test_step_batch_with_left_padding(onnx_fp32, model_dir):
    """Two prompts of different lengths in one batch (left-padded), then one decode step: each row's logits
    equal the PyTorch logits of that prompt alone."""
    model, _ = slimlm.load_model(str(model_dir))
    runner = OnnxCausalLM(onnx_fp32, threads=1)
    a, b = [5, 17, 42, 99, 7, 63], [11, 250, 31]
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = runner.step(ids, mask, pos, None)
    nxt = logits[:, -1].argmax(-1)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    logits2, present = runner.step(nxt[:, None].numpy(), mask2, pos[:, -1:] + 1, past)
    assert present[0][0].shape[2] == len(a) + 1
    with torch.no_grad():
        for row, prompt in enumerate([a, b]):
            ref = model(input_ids=torch.tensor([prompt + [int(nxt[row])]])).logits[0, -1]
            assert torch.allclose(logits2[row, -1], ref, atol=1e-4), (row, (logits2[row, -1] - ref).abs().max())


def test_sampling_is_seeded(onnx_fp32):
    runner = OnnxCausalLM(onnx_fp32, threads=1)
    prompt = [5, 17, 42]
    one = runner.generate(prompt, 12, do_sample=True, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    two = runner.generate(prompt, 12, do_sample=True, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    other = runner.generate(prompt, 12, do_sample=True, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False)
    assert one == two and one != other and all(0 <= t < runner.config.vocab_size for t in one)


@pytest.mark.parametrize("weights,int4_method,keep8", [
    ("int8", "kquant", export_mod.INT4_KEEP8), ("int4", "hqq", ()), ("int4", "rtn", ()),
    ("int4", "kquant", export_mod.INT4_KEEP8), ("int4", "rtn", ("head",)),
])
def test_quantized_export_stays_close(compressed_dir, weights, int4_method, keep8, tmp_path):
    out = tmp_path / weights
    cfg = OnnxConfig(weights=weights, int4_method=int4_method, int4_keep8=keep8)
    report = export_onnx(str(compressed_dir), out, cfg)["onnx"]
    model = slimlm.load_model(str(compressed_dir))[0]
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert report["disk_bytes"] < fp32_bytes
    min_cos, min_top1 = QUANT_BARS[weights]
    for c in report["validation"]["checks"]:
        assert c["cosine"] >= min_cos and c["top1_agreement"] >= min_top1, c
    import onnx

    # MatMulNBits nodes may be packed (q/k/v, gate/up): count the output rows (N) each width covers
    rows = {4: 0, 8: 0}
    for node in onnx.load(str(out / "model.onnx")).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            rows[attrs["bits"]] += attrs["N"]
    # which matrices stay at 8 bits: the head once, down_proj in every layer (the FFN replacement too),
    # q_proj, k_proj and v_proj in every layer that keeps attention
    cfg = model.config
    n_layers, n_attn = report["layers"]["attention"] + report["layers"]["ffn"], report["layers"]["attention"]
    kv_rows = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_name = {"head": (1, cfg.vocab_size), "down_proj": (n_layers, cfg.hidden_size),
                "q_proj": (n_attn, cfg.hidden_size), "k_proj": (n_attn, kv_rows), "v_proj": (n_attn, kv_rows)}
    all_rows = (cfg.vocab_size + n_layers * (cfg.hidden_size + 2 * cfg.intermediate_size)
                + n_attn * (2 * cfg.hidden_size + 2 * kv_rows))
    wide = all_rows if weights == "int8" else sum(n * r for n, r in (per_name[k] for k in keep8))
    wide_nodes = (1 + n_layers + n_attn * 4 + n_layers * 2) if weights == "int8" else sum(
        per_name[k][0] for k in keep8)
    assert rows[8] == wide and rows[4] == all_rows - wide
    assert report["quantized_matmuls"]["int8_nodes"] == wide_nodes
    assert report["quantized_matmuls"]["int4_nodes"] == 1 + n_layers * 3 + n_attn * 4 - wide_nodes
    lm = OnnxCausalLM(out, threads=1)
    assert len(lm.generate([5, 17, 42], 4, stop_at_eos=False)) == 4
    ids, mask, pos = np.array([[5, 17, 42, 99]]), np.ones((1, 4), np.int64), np.arange(4)[None]
    # the quantized head over one row: MatMulNBits takes its one-row kernel there, so int4 differs in the last bits
    kept, full = lm.step(ids, mask, pos, last=1)[0], lm.step(ids, mask, pos)[0][:, -1:]
    torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-5)
    assert torch.equal(kept.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_export_reads_a_quantized_embedding(tmp_path, tied):
    """The embedding of an int8/int4 export is not kept in fp32: a tied one is read from the head's own 8-bit
    blocks (the file holds the matrix once), an untied one gets 8-bit blocks of its own."""
    import onnx

    from slimlm.testing import save_tiny

    src = save_tiny(tmp_path / "src", tied=tied)
    out = tmp_path / "int8"
    report = export_onnx(str(src), out, OnnxConfig(weights="int8"))["onnx"]
    # a tied embedding is the head's matrix, at the head's block; an untied one gets the layers' block
    block = DEFAULT_HEAD_BLOCK if tied else DEFAULT_BLOCK["int8"]
    assert report["quantized_matmuls"]["embedding"] == {"bits": 8, "block_size": block, "shared_with_head": tied}
    graph = onnx.load(str(out / "model.onnx")).graph
    model = slimlm.load_model(str(src))[0]
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    floats = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims[:] in (
        [vocab, hidden], [hidden, vocab])]
    assert floats == []  # neither the table nor the head in fp32
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and not [n for n in graph.node if n.op_type == "Gather" and "embed" in n.name]
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = next((n for n in graph.node if n.output[0] == gathers[0].input[0]), None)
    assert (reshape is not None and reshape.input[0] == head.input[1]) is tied
    assert set(gathers[0].input[2:]) <= ({head.input[2], head.input[3]} if tied else {
        t.name for t in graph.initializer})
    # the graph's embedding rows are the table within 8-bit rounding: the validation's logits say so overall
    for c in report["validation"]["checks"]:
        assert c["cosine"] >= QUANT_BARS["int8"][0], c


def test_quantize_embedding_rounds_each_block_to_8_bits():
    """An untied table alone: GatherBlockQuantized gives each row within half a step of its block's scale."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimlm.export.graph import quantize_embedding

    rng = np.random.default_rng(0)
    table = (rng.standard_normal((50, 64)) * rng.uniform(0.01, 3, (50, 1))).astype(np.float32)
    table[7] = 0.0  # a constant block
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 64])],
        [numpy_helper.from_array(table, "table")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    assert quantize_embedding(model, None, 32) == {"bits": 8, "block_size": 32, "shared_with_head": False}
    assert [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT] == ["embed_scales"]
    ids = np.arange(50)
    rows = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    blocks = table.reshape(50, 2, 32)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 255
    err = np.abs(rows - table).reshape(50, 2, 32).max(-1)
    assert np.all(err <= step / 2 + 1e-6) and np.all(rows[7] == 0)
    assert onnx.checker.check_model(model) is None


def test_embedding_takes_a_smaller_block_where_the_hidden_size_needs_one():
    """A hidden size that is no whole number of blocks (48 at 32) gets the largest block that divides it (16), not
    an fp32 embedding; one that no 16-value block divides stays as it is."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from slimlm.export.graph import quantize_embedding

    def model(hidden):
        table = np.random.default_rng(0).standard_normal((20, hidden)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")], "g",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
            [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, hidden])],
            [numpy_helper.from_array(table, "table")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    assert quantize_embedding(model(48), None, 32) == {"bits": 8, "block_size": 16, "shared_with_head": False}
    assert quantize_embedding(model(64), None, 64) == {"bits": 8, "block_size": 64, "shared_with_head": False}
    assert quantize_embedding(model(40), None, 32) is None


def test_block_size_defaults_by_weight_type():
    assert OnnxConfig(weights="int8").block_size == DEFAULT_BLOCK["int8"] == 64
    assert OnnxConfig(weights="int8").head_block_size == DEFAULT_HEAD_BLOCK == 32
    assert OnnxConfig(weights="int4").block_size == 32
    assert OnnxConfig(weights="int4").head_block_size is None
    assert OnnxConfig(weights="int8", block_size=32).block_size == 32
    for bad in (dict(weights="int8", block_size=48), dict(weights="int8", head_block_size=48),
                dict(weights="int4", head_block_size=32)):
        with pytest.raises(SlimlmError):
            OnnxConfig(**bad)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_head_gets_its_own_block(tmp_path, tied):
    """int8: every weight MatMulNBits at the layers' block except the head, at the head's block."""
    import onnx

    from slimlm.testing import save_tiny

    src = save_tiny(tmp_path / "src", tied=tied)
    report = export_onnx(str(src), tmp_path / "int8", OnnxConfig(weights="int8", block_size=64, head_block_size=16,
                                                                validate=False))["onnx"]
    assert report["quantized_matmuls"]["head_block_size"] == 16
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    vocab = slimlm.load_model(str(src))[0].config.vocab_size
    blocks = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            blocks.setdefault("head" if attrs["N"] == vocab else "layers", set()).add(attrs["block_size"])
    assert blocks == {"head": {16}, "layers": {64}}


def test_failed_validation_is_an_error(tiny_dir, tmp_path, monkeypatch):
    strict = {**export_mod.TOLERANCES, "int8": {"max_abs_diff": 0.0, "min_cosine": 1.0, "min_top1": 1.0}}
    monkeypatch.setattr(onnx_validate, "TOLERANCES", strict)  # the validation step reads its own bars
    with pytest.raises(SlimlmError, match="validation failed"):
        export_onnx(str(tiny_dir), tmp_path / "out", OnnxConfig(weights="int8"))
    assert not (tmp_path / "out").exists()


def test_export_cli(compressed_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", "onnx", str(compressed_dir), "-o", str(out), "--weights", "int4",
                 "--int4-keep8", "head, down_proj"]) == 0
    assert "greedy tokens identical" in capsys.readouterr().out
    cfg = json.loads((out / "slimlm.json").read_text())["onnx"]["config"]
    assert cfg["weights"] == "int4" and cfg["int4_method"] == "kquant" and cfg["int4_keep8"] == ["head", "down_proj"]
    assert main(["export", "onnx", str(compressed_dir), "-o", str(out)]) == 2  # exists, no --force


@pytest.mark.parametrize("case", ["missing model", "unknown weights", "unwritable out", "bad opset",
                                  "keep8 names nothing", "keep8 with hqq"])
def test_export_bad_input(tiny_dir, tmp_path, capsys, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out" if case == "unwritable out" else tmp_path / "out"
    args = ["export", "onnx", str(tmp_path / "nope") if case == "missing model" else str(tiny_dir), "-o", str(out)]
    args += {"unknown weights": ["--weights", "int3"], "bad opset": ["--opset", "7"],
             "keep8 names nothing": ["--weights", "int4", "--int4-keep8", "head,down_projection"],
             "keep8 with hqq": ["--weights", "int4", "--int4-method", "hqq", "--int4-keep8", "head"]}.get(case, [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimlm: error:")
    if case.startswith("keep8"):
        assert "--int4-keep8" in err[0] and ("down_projection" in err[0] or "hqq" in err[0])
    assert not out.exists()


def test_tracing_wrapper_passes_the_cache_under_the_current_name(compressed_dir):
    """The plain-attention wrapper calls decoder layers with the cache argument named as the installed
    transformers names it (`cache` since 5.24, where `past_key_values` warns and later goes away)."""
    import warnings

    model, _ = slimlm.load_model(str(compressed_dir))
    wrapper = export_mod.DecoderWithPast(model).eval()
    kv_heads, head_dim = export_mod.kv_shape(model.config)
    empty = [(torch.zeros(1, kv_heads, 0, head_dim),) * 2 for _ in wrapper.kv_layers]
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        logits, present = wrapper(ids, torch.ones_like(ids), torch.arange(3)[None], empty)
    assert logits.shape[:2] == (1, 3) and present[0][0].shape[2] == 3
    assert not [w for w in seen if "past_key_values" in str(w.message)]


def test_default_providers_ask_for_cuda_only_with_a_device(monkeypatch):
    from slimlm.export.runtime import default_providers

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_providers(both) == ["CPUExecutionProvider"]  # onnxruntime-gpu on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_providers(both) == both
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_export_leaves_logging_alone_and_quiet(compressed_dir, tmp_path):
    """onnxruntime's int4/int8 quantizer runs logging.basicConfig(level=INFO) when imported; after an export the
    root logger must be as it was (a script's or a server's own logging untouched) and nothing at INFO printed."""
    code = ("import logging, sys\n"
            "from slimlm.export.onnx import OnnxConfig, export_onnx\n"
            f"export_onnx({str(compressed_dir)!r}, {str(tmp_path / 'o')!r}, OnnxConfig(weights='int8'))\n"
            f"export_onnx({str(compressed_dir)!r}, {str(tmp_path / 'p')!r}, OnnxConfig(weights='fp32'))\n"
            "root = logging.getLogger()\n"
            "sys.exit(0 if root.level == logging.WARNING and not root.handlers else 3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[INFO]" not in proc.stderr and " INFO " not in proc.stderr


def _genai_python() -> str | None:
    """A Python with onnxruntime-genai: this one, or SLIMLM_GENAI_PYTHON (genai pins its own onnxruntime, so it
    usually lives in a venv of its own)."""
    import importlib.util
    import os

    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return sys.executable
    return os.environ.get("SLIMLM_GENAI_PYTHON")


def test_export_writes_a_genai_config_that_names_the_graph(compressed_dir, tmp_path):
    """genai_config.json counts the graph's cache entries (the FFN slot has none), names inputs and outputs that
    the graph has, and takes the context of the rotary table."""
    import onnx

    info = export_mod.export_onnx(str(compressed_dir), tmp_path / "o", OnnxConfig(validate=False))["onnx"]
    cfg = json.loads((tmp_path / "o" / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert info["ffn_layers"] and dec["num_hidden_layers"] == len(info["kv_layers"])  # not config.json's count
    graph = onnx.load(str(tmp_path / "o" / "model.onnx"), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    n = dec["num_hidden_layers"]
    for names, pool in ((dec["inputs"], inputs), (dec["outputs"], outputs)):
        for pattern in names.values():
            want = {pattern % j for j in range(n)} if "%d" in pattern else {pattern}
            assert want <= pool, (pattern, pool)
    assert len([x for x in inputs if x.startswith("past_key_values.")]) == 2 * n
    assert cfg["model"]["context_length"] == info["max_positions"] and dec["head_size"] == info["head_dim"]
    assert cfg["search"]["past_present_share_buffer"] is False


@pytest.mark.skipif(_genai_python() is None, reason="onnxruntime-genai (here or in SLIMLM_GENAI_PYTHON)")
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_onnxruntime_genai_runs_the_export_unchanged(compressed_dir, tmp_path, weights):
    """og.Model(OUT) with og.Generator: the greedy tokens of OnnxCausalLM, FFN slot included."""
    out = tmp_path / weights
    export_mod.export_onnx(str(compressed_dir), out, OnnxConfig(weights=weights, validate=False))
    prompt = [5, 17, 42, 99, 7]
    code = ("import json, sys, onnxruntime_genai as og; m = og.Model(sys.argv[1]); "
            "p = og.GeneratorParams(m); p.set_search_options(max_length=len(json.loads(sys.argv[2])) + 12, "
            "do_sample=False); g = og.Generator(m, p); g.append_tokens(json.loads(sys.argv[2])); out = []\n"
            "while not g.is_done():\n    g.generate_next_token(); out.append(int(g.get_next_tokens()[0]))\n"
            "print(json.dumps(out))")
    res = subprocess.run([_genai_python(), "-c", code, str(out), json.dumps(prompt)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want = OnnxCausalLM(out, threads=1).generate(prompt, 12, stop_at_eos=False)
    eos = set(OnnxCausalLM(out, threads=1).eos_token_ids)
    n = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))  # genai stops at the end token
    assert got == want[:n]


def test_more_bits_layers_follow_llama_cpp():
    from slimlm.export.onnx_quant import _layer_index, more_bits

    assert [i for i in range(24) if more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    assert [i for i in range(6) if more_bits(i, 6)] == [2, 5]
    assert _layer_index("layers_13_mlp_down_proj") == 13 and _layer_index("head") is None


def test_mixed_keep8_layers_keep_fewer_matrices_at_8_bits(compressed_dir, tmp_path):
    from slimlm.export.onnx import OnnxConfig, export_onnx, exported_with

    every = export_onnx(str(compressed_dir), tmp_path / "all", OnnxConfig(weights="int4"))["onnx"]
    mixed_cfg = OnnxConfig(weights="int4", int4_keep8_layers="mixed")
    mixed = export_onnx(str(compressed_dir), tmp_path / "mixed", mixed_cfg)["onnx"]
    assert mixed["validation"]["passed"]
    n_all, n_mixed = every["quantized_matmuls"], mixed["quantized_matmuls"]
    assert n_mixed["int8_nodes"] < n_all["int8_nodes"] and n_mixed["int4_nodes"] > n_all["int4_nodes"]
    assert exported_with(tmp_path / "mixed", mixed_cfg) and not exported_with(tmp_path / "all", mixed_cfg)
    with pytest.raises(SlimlmError, match="int4_keep8_layers"):
        OnnxConfig(weights="int4", int4_keep8_layers="some")
