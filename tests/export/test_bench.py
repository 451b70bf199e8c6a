"""`slimlm bench export` argument handling (the measurements themselves are benchmarks, not tests)."""

import pytest

from slimlm.cli import main
from slimlm.export.bench import _onnx_config, _print_table, _ratios, _variant_ok


def test_plain_variant_of_an_onnx_backend():
    assert _onnx_config("ort-int4").attention == "auto" and _onnx_config("ort-int4").weights == "int4"
    assert _onnx_config("ort-int8+plain").attention == "plain" and _onnx_config("ort-int8+plain").weights == "int8"


def test_all4_variant_drops_the_8_bit_exceptions():
    default, all4 = _onnx_config("ort-int4"), _onnx_config("ort-int4+all4")
    assert default.int4_keep8 and not all4.int4_keep8 and all4.weights == "int4" and all4.attention == "auto"
    assert _variant_ok("ort-int4+all4") and not _variant_ok("ort-int8+all4") and not _variant_ok("torch-fp32+all4")


def test_stepped_variant_runs_the_base_export_with_the_cache_passed_per_step(tmp_path, monkeypatch):
    import slimlm.export.bench as bench

    built = []
    monkeypatch.setattr(bench, "_built_as_now", lambda target, backend: False)
    monkeypatch.setattr("slimlm.export.onnx.export_onnx", lambda src, target, cfg, overwrite: built.append(target))
    monkeypatch.setattr(bench, "_hf_dir", lambda spec: "src")
    assert bench.prepare("m", "ort-int4+stepped", tmp_path) == str(tmp_path / "ort-int4")
    assert built == [tmp_path / "ort-int4"]  # the base row's artefact, not a second export
    assert _variant_ok("ort-int8+stepped") and not _variant_ok("torch-fp32+stepped")
    seen = {}
    monkeypatch.setattr(bench._Ort, "__init__", lambda self, path, threads, share_buffer=True: seen.update(
        share=share_buffer))
    bench._load("ort-int4+stepped", "x", 1)
    assert seen["share"] is False
    bench._load("ort-int4", "x", 1)
    assert seen["share"] is True


def test_unknown_backends_exit_2(capsys):
    for bad in ("ort-int3", "torch-fp32+plain", "ort-int4+fused", "ort-fp32+all4"):
        assert main(["bench", "export", "--backends", bad, "--ppl", ""]) == 2
        assert bad in capsys.readouterr().err


def test_llama_cpp_ratio_per_round():
    rows = [{"model": "d", "backend": "llama-cpp", "decode_tok_s": 100.0, "decode_tok_s_all": [100.0, 80.0, 120.0]},
            {"model": "c", "backend": "ort-int4", "decode_tok_s": 130.0, "decode_tok_s_all": [130.0, 120.0, 132.0]}]
    _ratios(rows)
    assert rows[1]["decode_vs_llama_cpp"] == 1.3
    assert rows[1]["decode_vs_llama_cpp_rounds"] == [1.3, 1.5, 1.1]
    assert rows[1]["decode_vs_llama_cpp_round_median"] == 1.3


def test_table_without_a_torch_row_shows_no_ratio(capsys):
    """With no dense torch-fp32 row there is nothing to compare against: a dash, not 0.00x."""
    rows = [{"model": "c", "backend": "ort-int4", "runs": 1, "disk_mb": 1.0, "peak_rss_mb": 9.0, "ppl": 5.0,
             "prefill_tok_s": 10.0, "decode_tok_s": 20.0, "decode_tok_s_all": [20.0]}]
    _ratios(rows)
    _print_table(rows)
    line = capsys.readouterr().out.splitlines()[-1]
    assert "0.00" not in line and line.split()[-2:] == ["-", "-"]


def test_a_worker_that_dies_is_reported_by_its_cause(monkeypatch):
    import subprocess

    import slimlm.export.bench as bench

    def fake(returncode, stderr):
        return lambda *a, **k: subprocess.CompletedProcess(a, returncode, stdout="", stderr=stderr)

    bar = "Loading weights: 100%|##########| 272/272 [00:00<00:00, 29663.30it/s]"
    monkeypatch.setattr(bench.subprocess, "run", fake(-11, bar))  # a segfault in native code says nothing
    assert bench._run_worker({"threads": 1}) == {"error": "the worker died of SIGSEGV"}
    monkeypatch.setattr(bench.subprocess, "run", fake(1, "ValueError: bad prompt\n" + bar + "\r" + bar))
    assert bench._run_worker({"threads": 1}) == {"error": "ValueError: bad prompt"}


@pytest.mark.parametrize("extra, message", [
    (["--model", "d={tmp}/missing"], "unknown model"),
    (["--model", "d={model}", "--model", "d={model}"], "--model names must be unique"),
    (["--model", "d={model}", "--ppl", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["--model", "d={model}", "--json", "{tmp}"], "is a directory, not a file"),
    (["--model", "d={model}", "--repeats", "0"], "expected a positive integer, got 0"),
])
def test_bench_export_bad_input_fails_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch, extra, message):
    import slimlm.export.bench as bench

    def must_not_run(*args, **kwargs):
        raise AssertionError("an artefact was prepared although an input is bad")

    monkeypatch.setattr(bench, "prepare", must_not_run)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    args = ["bench", "export", "--backends", "torch-fp32", "--ppl", "", "--work", str(tmp_path / "work")]
    try:
        code = main(args + [a.format(tmp=tmp_path, model=tiny_dir) for a in extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_gguf_rows_export_with_slimlm_and_are_reused(tiny_dir, tmp_path):
    """llama-cpp-q8_0 runs any model through `slimlm export gguf` (written by the gguf package itself: no
    llama.cpp needed to build it); a second prepare reuses the file, a different type makes its own."""
    import json
    import os

    from slimlm.export.bench import BACKENDS, GGUF_ROWS, prepare

    assert set(GGUF_ROWS) <= set(BACKENDS)
    path = prepare(str(tiny_dir), "llama-cpp-q8_0", tmp_path)
    with open(path + ".json") as f:
        record = json.load(f)
    assert path.endswith("model.gguf") and record["gguf"]["config"]["type"] == "q8_0"
    stamp = os.stat(path).st_mtime_ns
    assert prepare(str(tiny_dir), "llama-cpp-q8_0", tmp_path) == path
    assert os.stat(path).st_mtime_ns == stamp


def test_gguf_rows_are_skipped_without_llama_cpp(tiny_dir, tmp_path, capsys, monkeypatch):
    import slimlm.export.bench as bench

    monkeypatch.setattr(bench, "_llama_cpp_ok", lambda spec: False)
    monkeypatch.setattr(bench, "prepare", lambda *a: (_ for _ in ()).throw(AssertionError("prepared")))
    code = main(["bench", "export", "--model", f"d={tiny_dir}", "--backends", "llama-cpp-q4_k_m", "--ppl", "",
                 "--work", str(tmp_path / "w")])
    assert code == 0 and "skip d/llama-cpp-q4_k_m: llama-cpp-python is not installed" in capsys.readouterr().err


def test_genai_ratio_per_round_is_against_the_same_models_mixed_row():
    rows = [{"model": "c", "backend": "genai-int4-mixed", "decode_tok_s": 100.0, "decode_tok_s_all": [100.0, 80.0]},
            {"model": "c", "backend": "ort-int4", "decode_tok_s": 110.0, "decode_tok_s_all": [110.0, 96.0]},
            {"model": "d", "backend": "ort-int4", "decode_tok_s": 90.0, "decode_tok_s_all": [90.0, 90.0]}]
    _ratios(rows)
    assert rows[1]["decode_vs_genai_mixed_rounds"] == [1.1, 1.2] and rows[1]["decode_vs_genai_mixed"] == 1.15
    assert "decode_vs_genai_mixed" not in rows[2]  # another model has no peer row: no ratio


def test_genai_rows_are_skipped_without_onnxruntime_genai(tiny_dir, tmp_path, capsys, monkeypatch):
    import slimlm.export.bench as bench

    monkeypatch.setattr(bench, "genai_python", lambda: None)
    monkeypatch.setattr(bench, "prepare", lambda *a: (_ for _ in ()).throw(AssertionError("prepared")))
    code = main(["bench", "export", "--model", f"d={tiny_dir}", "--backends", "genai-int4,genai-int4-mixed",
                 "--ppl", "", "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 0 and "skip d/genai-int4: onnxruntime-genai is not installed" in err and "d/genai-int4-mixed" in err


def test_genai_python_is_the_named_one(monkeypatch, tmp_path):
    from slimlm.export.bench import genai_python

    monkeypatch.setenv("SLIMLM_GENAI_PYTHON", str(tmp_path / "missing"))
    assert genai_python() is None  # named but absent: no row, not a crash later
    (tmp_path / "python").write_text("")
    monkeypatch.setenv("SLIMLM_GENAI_PYTHON", str(tmp_path / "python"))
    assert genai_python() == str(tmp_path / "python")


@pytest.mark.skipif(__import__("slimlm.export.bench", fromlist=["genai_python"]).genai_python() is None,
                    reason="onnxruntime-genai (here or in SLIMLM_GENAI_PYTHON)")
def test_genai_rows_run_the_builders_graph(tiny_dir, tmp_path, capsys):
    """The peer rows build with onnxruntime-genai's own builder (reused on the next run) and measure in its
    Generator: perplexity over the same windows as slimlm's rows, within what int4 costs."""
    import json
    import os

    ppl = tmp_path / "text.txt"
    ppl.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = ["bench", "export", "--model", f"d={tiny_dir}", "--backends", "ort-fp32,genai-int4-mixed", "--ppl",
            str(ppl), "--windows", "2", "--seq-len", "64", "--prefill", "32", "--decode", "8", "--repeats", "1",
            "--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    peer = rows["genai-int4-mixed"]
    assert peer["runs"] == 1 and not peer["errors"]  # the worker ran in the peer's Python and reported
    assert {"decode_tok_s", "prefill_tok_s", "peak_rss_mb"} <= set(peer)
    assert abs(peer["ppl"] / rows["ort-fp32"]["ppl"] - 1) < 0.5
    built = tmp_path / "w" / "d" / "genai-int4-mixed" / "model.onnx"
    stamp = os.stat(built).st_mtime_ns
    assert main(args) == 0 and os.stat(built).st_mtime_ns == stamp
