"""slimlm profile on tiny random models: the parts of a step add up to it, an FFN slot has no attention and no KV
cache, --compare ratios come from the rows, the CLI writes its JSON and PNGs and refuses bad input in one line."""

import json
import statistics

import pytest
import torch

from slimlm.profile import KINDS, PHASES, ProfileConfig, compare, profile_models

# one thread: the tests share the machine, and two threads that wait on each other slow every op on a busy one
CFG = dict(contexts=(8, 24), batches=(1, 2), steps=4, repeats=2, threads=1, progress=False)


@pytest.fixture(scope="module")
def report(tiny_dir, ffn_dir):
    torch.manual_seed(0)
    return profile_models([str(tiny_dir), str(ffn_dir)], ProfileConfig(**CFG))


def test_parts_add_up_to_the_step(report):
    for m in report["models"]:
        assert [(p["context"], p["batch"]) for p in m["points"]] == [(8, 1), (24, 1), (8, 2), (24, 2)]
        for p in m["points"]:
            for phase in PHASES:
                ph = p[phase]
                kinds = ph["kinds_ms"]
                assert set(kinds) == set(KINDS)
                assert all(v >= -1e-6 for v in kinds.values()), kinds
                assert sum(kinds.values()) == pytest.approx(ph["profiled_ms"], rel=1e-9, abs=1e-9)
                assert ph["parts_sum_ms"] == pytest.approx(ph["profiled_ms"], rel=1e-9, abs=1e-9)
                # the profiler ranges describe the call they wrap: against a wall clock around the same call
                assert ph["parts_sum_ms"] == pytest.approx(ph["profiled_wall_ms"], rel=0.10)
                # every layer's parts add up to the layer, and the layers sit inside the step
                for layer in ph["layers"]:
                    assert sum(layer["kinds_ms"].values()) == pytest.approx(layer["ms"], abs=1e-9)
                    assert min(layer["kinds_ms"].values()) >= -1e-6
                assert sum(layer["ms"] for layer in ph["layers"]) < ph["profiled_ms"]
                assert kinds["head"] > 0 and kinds["sampling"] > 0 and kinds["mlp"] > 0 and kinds["attention"] > 0
                # each profiled run against the unprofiled one just before it, the median of those ratios
                assert ph["check_paired"] and len(ph["profiled_runs_ms"]) == len(ph["plain_ms"])
                ratios = sorted(a / b for a, b in zip(ph["profiled_runs_ms"], ph["plain_ms"]))
                assert ph["check"] == pytest.approx(statistics.median(ratios) - 1)
                assert ph["check_ok"] == (abs(ph["check"]) <= 0.10)
                assert min(ph["plain_ms"]) <= ph["step_ms"] <= max(ph["plain_ms"])
            lat = p["decode_latency"]
            assert lat["steps"] == CFG["steps"] and len(lat["series_ms"]) == CFG["steps"]
            assert min(lat["series_ms"]) <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] == max(lat["series_ms"])


def test_ffn_slot_has_no_attention_and_no_kv_cache(report, slot_layout):
    dense, small = report["models"]
    slot_layout(dense, small)
    assert [layer["source_layers"] for layer in dense["layers"]] == [[i] for i in range(6)]
    per_token = small["memory"]["kv_bytes_per_token_by_layer"]
    assert all(b > 0 for i, b in enumerate(per_token) if i != 2)
    for m in (dense, small):
        for p in m["points"]:
            mem = p["memory"]
            assert mem["kv_bytes"] == mem["kv_bytes_expected"] == m["memory"]["kv_bytes_per_token"] * p["context"] * \
                p["batch"]
            assert mem["kv_bytes_end"] > mem["kv_bytes"]
            assert mem["rss_peak_bytes"] is None or mem["rss_peak_bytes"] > m["memory"]["weights_bytes"]
            # the step's tensors at their peak hold at least the KV entries the prefill writes; a decode step at
            # least the key/value of its new position (a cache grown by concatenation holds a whole new copy)
            alloc = mem["step_alloc_peak_bytes"]
            assert alloc["prefill"] >= mem["kv_bytes"]
            assert alloc["decode"] >= m["memory"]["kv_bytes_per_token"] * p["batch"]
    for p in small["points"]:
        assert p["memory"]["kv_bytes_by_layer"][2] == 0
        for phase in PHASES:
            slot = p[phase]["layers"][2]["kinds_ms"]
            assert slot.get("attention", 0.0) == 0.0 and "mlp" not in slot and slot["ffn"] > 0
            assert all(layer["kinds_ms"]["attention"] > 0 for i, layer in enumerate(p[phase]["layers"]) if i != 2)
            assert p[phase]["kinds_ms"]["ffn"] == pytest.approx(slot["ffn"])
    for p in dense["points"]:
        assert p["prefill"]["kinds_ms"]["ffn"] == 0.0


def test_compare_ratios_come_from_the_rows(report):
    dense, small = report["models"]
    (cmp,) = report["compare"]
    assert cmp == compare(dense, small)
    assert (cmp["model"], cmp["against"]) == (small["model"], dense["model"])
    assert cmp["memory"]["weights_bytes"] == small["memory"]["weights_bytes"] / dense["memory"]["weights_bytes"]
    assert cmp["memory"]["kv_bytes_per_token"] == pytest.approx(4 / 6)
    assert len(cmp["points"]) == len(dense["points"])
    for row, a, b in zip(cmp["points"], dense["points"], small["points"]):
        assert (row["context"], row["batch"]) == (a["context"], a["batch"]) == (b["context"], b["batch"])
        for phase in PHASES:
            assert row[phase]["step"] == b[phase]["step_ms"] / a[phase]["step_ms"]
            for kind in KINDS:
                want = b[phase]["kinds_ms"][kind] / a[phase]["kinds_ms"][kind] if a[phase]["kinds_ms"][kind] else None
                assert row[phase]["kinds"][kind] == want
        assert row["decode_latency"]["p99_ms"] == b["decode_latency"]["p99_ms"] / a["decode_latency"]["p99_ms"]
        assert row["kv_bytes"] == pytest.approx(4 / 6)


def test_table_and_figures(report, tmp_path):
    from slimlm.profile_plots import figure_data, format_table, write_plots

    text = format_table(report)
    dense, small = report["models"]
    assert dense["model"] in text and small["model"] in text and "removed" in text and "ffn slot 2" in text
    data = figure_data(report)
    decode = data["layers"]["phases"]["decode"]
    assert decode["layer"] == list(range(6))
    rows = decode["models"][1]["rows"]
    assert rows[3] == "removed" and rows[2]["kind"] == "ffn" and rows[4]["index"] == 3
    files = write_plots(report, tmp_path / "plots")
    assert sorted(p.name for p in files) == sorted(f"{s}.{e}" for s in ("layers", "latency", "memory")
                                                   for e in ("png", "json"))
    for p in files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert json.loads(p.read_text()) == json.loads(json.dumps(data[p.stem]))


def test_cli_writes_json_and_plots(tiny_dir, ffn_dir, tmp_path, capsys):
    from slimlm.cli import main

    out = tmp_path / "sub" / "report.json"
    rc = main(["profile", str(tiny_dir), "--compare", str(ffn_dir), "--contexts", "8", "--steps", "2",
               "--repeats", "1", "--threads", "1", "--json", str(out), "--plots", str(tmp_path / "plots"), "--quiet"])
    assert rc == 0
    got = json.loads(out.read_text())
    assert [m["model"] for m in got["models"]] == [str(tiny_dir), str(ffn_dir)]
    assert got["config"]["contexts"] == [8] and got["compare"][0]["against"] == str(tiny_dir)
    assert (tmp_path / "plots" / "layers.png").is_file() and (tmp_path / "plots" / "memory.json").is_file()
    stdout = capsys.readouterr().out
    assert "parts sum" in stdout and "check" in stdout


def _run(argv) -> int:
    from slimlm.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return exc.code


@pytest.mark.parametrize("argv, words", [
    (["--backend", "tvm"], "unknown backend"),
    (["--contexts", "4096"], "past the context"),
    (["--contexts", "2040"], "past the context"),  # 2040 + the decode steps is past 2048
    (["--contexts", "8,0"], "positive"),
    (["--compare", "NOT_A_MODEL_FILE"], "model"),
    (["--compare", "DIR_WITHOUT_CONFIG"], "config.json"),
    (["--json", "."], "directory"),
])
def test_cli_bad_input_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOT_A_MODEL_FILE").write_text("hello")
    (tmp_path / "DIR_WITHOUT_CONFIG").mkdir()
    assert _run(["profile", str(tiny_dir), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert words in err
