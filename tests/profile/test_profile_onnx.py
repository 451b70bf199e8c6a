"""slimlm profile of ONNX exports (onnxruntime's profiler): the parts of a step add up to it, an FFN slot has no
attention and no KV cache, a torch model and its exports compare in one report, bad input is one line."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from slimlm.profile import KINDS, PHASES, ProfileConfig, profile_models  # noqa: E402

CFG = dict(contexts=(8, 24), batches=(1, 2), steps=4, repeats=2, threads=1, progress=False)


@pytest.fixture(scope="module")
def exports(tiny_dir, ffn_dir, tmp_path_factory):
    from slimlm.export.onnx import OnnxConfig, export_onnx

    root = tmp_path_factory.mktemp("onnx")
    export_onnx(str(tiny_dir), root / "dense-fp32", OnnxConfig(weights="fp32"))
    export_onnx(str(ffn_dir), root / "ffn-int8", OnnxConfig(weights="int8"))
    return root / "dense-fp32", root / "ffn-int8"


@pytest.fixture(scope="module")
def report(tiny_dir, exports):
    return profile_models([str(tiny_dir), *map(str, exports)], ProfileConfig(**CFG))


def test_each_model_by_its_backend(report, exports):
    assert [m["backend"] for m in report["models"]] == ["torch", "onnx", "onnx"]
    assert report["models"][1]["dtype"] == "fp32 weights" and report["models"][2]["dtype"] == "int8 weights"
    assert [c["model"] for c in report["compare"]] == [str(e) for e in exports]


def test_parts_add_up_to_the_step(report):
    for m in report["models"][1:]:
        assert [(p["context"], p["batch"]) for p in m["points"]] == [(8, 1), (24, 1), (8, 2), (24, 2)]
        for p in m["points"]:
            for phase in PHASES:
                ph = p[phase]
                kinds = ph["kinds_ms"]
                assert set(kinds) == set(KINDS) and all(v >= -1e-6 for v in kinds.values()), kinds
                assert sum(kinds.values()) == pytest.approx(ph["profiled_ms"], rel=1e-9)
                for layer in ph["layers"]:
                    assert sum(layer["kinds_ms"].values()) == pytest.approx(layer["ms"], abs=1e-9)
                assert 0 < sum(layer["ms"] for layer in ph["layers"]) < ph["profiled_ms"]
                # the profiled run's kernels sit inside onnxruntime's own record of the run, which sits inside
                # the wall clock around the call
                assert ph["ort_model_run_ms"] <= ph["profiled_wall_ms"]
                assert kinds["head"] > 0 and kinds["sampling"] > 0  # (a one-row Gather may take under 1 us)
                assert kinds["attention"] > 0 and kinds["mlp"] > 0 and kinds["norm"] > 0
                assert ph["check"] == pytest.approx(ph["parts_sum_ms"] / ph["step_ms"] - 1)
            lat = p["decode_latency"]
            assert len(lat["series_ms"]) == CFG["steps"] and lat["p50_ms"] <= lat["p99_ms"]


def test_every_weight_node_has_its_kind(exports):
    """The graph's nodes by kind: one embedding lookup, one head, the MLP's and attention's weight MatMuls in
    every layer they exist in (the FFN slot's under the layer its name scope names)."""
    import collections

    import onnx
    from transformers import AutoConfig

    from slimlm.profile_onnx import node_map

    for path in exports:
        graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        nodes = node_map(path / "model.onnx", AutoConfig.from_pretrained(str(path)))
        kinds = collections.Counter(kind for _, kind in nodes.values())
        assert kinds["embedding"] == 1 and kinds["head"] == 1, kinds
        weights = [n.name for n in graph.node if n.op_type in ("MatMul", "MatMulNBits") and
                   nodes[n.name][1] in ("mlp", "attention")]
        assert len(weights) >= 2 * 4 and all(nodes[n][1] is not None for n in weights)


def test_ffn_slot_has_no_attention_and_no_kv_cache(report, slot_layout):
    dense, small = report["models"][1:]
    slot_layout(dense, small)
    for m in (dense, small):
        for p in m["points"]:
            mem = p["memory"]
            assert mem["kv_bytes"] == mem["kv_bytes_expected"]
            assert mem["kv_bytes_end"] > mem["kv_bytes"]
    for p in small["points"]:
        for phase in PHASES:
            layers = p[phase]["layers"]
            slot = layers[2]["kinds_ms"]
            assert slot.get("attention", 0.0) == 0.0 and "mlp" not in slot and slot["ffn"] > 0
            assert all(layer["kinds_ms"].get("attention", 0) > 0 and layer["kinds_ms"].get("mlp", 0) > 0
                       for i, layer in enumerate(layers) if i != 2)


def test_table_shows_the_onnx_models(report):
    from slimlm.profile_plots import format_table

    text = format_table(report)
    assert "onnx" in text and "ffn slot 2" in text


@pytest.mark.parametrize("case", ["not an export", "bad backend for a model"])
def test_bad_input_is_one_line(tiny_dir, tmp_path, capsys, case):
    from slimlm.cli import main

    argv = ["profile", str(tiny_dir), "--quiet", "--backend", "onnx"] if case == "bad backend for a model" else [
        "profile", str(tiny_dir), "--quiet", "--backend", "onnx", "--compare", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not an ONNX export" in err, err
