"""`slimlm bench compress` end to end on the tiny model: rows, the text row's calibration, the summary file."""

import json

import pytest


def test_bench_compress_rows_and_summary(tiny_dir, calib_file, tmp_path, capsys):
    from slimlm.compress.bench import main

    out = tmp_path / "bench.json"
    rc = main(["--model", str(tiny_dir), "--ppl", str(calib_file), "--windows", "2", "--seq-len", "32",
               "--layers", "2", "--calib-samples", "4", "--epochs", "1",
               "--rows", "dense,removal,streamline+ffn(text)", "--json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary  # final line = the file
    assert summary["machine"]["cpu_threads"] >= 1 and summary["versions"]["torch"]
    rows = {r["row"]: r for r in summary["results"]}
    assert list(rows) == ["dense", "removal", "streamline+ffn(text)"]
    assert rows["dense"]["layers"] == 6 and rows["removal"]["layers"] == 4
    assert rows["streamline+ffn(text)"]["layers"] == 5  # 2 removed, one replacement slot
    assert rows["dense"]["compress_s"] == 0 and rows["removal"]["compress_s"] > 0
    assert rows["removal"]["params"] < rows["streamline+ffn(text)"]["params"] < rows["dense"]["params"]


@pytest.mark.parametrize("extra, message", [
    (["--ppl", "{tmp}/missing.txt"], "perplexity file not found"),
    (["--ppl", "{tmp}"], "is a directory, not a text file"),
    (["--ppl", "{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["--mc", "{tmp}/g.jsonl"], "--mc takes NAME=FILE"),
    (["--mc", "a={tmp}/g.jsonl", "--mc", "a={tmp}/g.jsonl"], "--mc names must be unique"),
    (["--rows", "dense,bogus"], "unknown row 'bogus'"),
    (["--json", "{tmp}"], "is a directory, not a file"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--rows", "dense,width", "--width-ratio", "1.5"], "--width-ratio must be in (0, 1)"),
    (["--rows", "dense,depth+width", "--depth-width", "4"], "--depth-width takes LAYERS:RATIO"),
])
def test_bench_compress_bad_input_fails_before_loading(tiny_dir, calib_file, tmp_path, capsys, monkeypatch, extra,
                                                       message):
    import slimlm.models
    from slimlm.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although an input is bad")

    monkeypatch.setattr(slimlm.models, "load_model", must_not_load)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "c", "choices": ["a", "b"], "label": 0}) + "\n")
    args = ["bench", "compress", "--model", str(tiny_dir), "--ppl", str(calib_file), "--rows", "dense"]
    assert main(args + [a.format(tmp=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_norec_rows_turn_recovery_off_and_keep_the_rest():
    from slimlm.compress.bench import _row_config

    assert _row_config("streamline+ffn-norec") == {**_row_config("streamline+ffn"), "recover_minutes": 0.0}
    assert _row_config("streamline+ffn(mse)-norec")["train_loss"] == "mse"
    assert "recover_minutes" not in _row_config("shortgpt")


def test_width_rows_prune_width_alone_and_after_depth(tiny_dir, calib_file, tmp_path):
    from slimlm.compress.bench import _row_config, _widths, main

    widths = _widths(0.2, "2:0.1")
    assert _row_config("width", widths)["method"] == "width" and _row_config("width", widths)["layers"] is None
    assert _row_config("depth+width-norec", widths)["recover_minutes"] == 0.0
    out = tmp_path / "bench.json"
    rc = main(["--model", str(tiny_dir), "--ppl", str(calib_file), "--windows", "2", "--seq-len", "32",
               "--layers", "2", "--calib-samples", "4", "--epochs", "1",
               "--rows", "dense,width-norec,depth+width-norec", "--width-ratio", "0.2", "--depth-width", "2:0.1",
               "--json", str(out)])
    assert rc == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["width-norec"]["layers"] == 6 and rows["depth+width-norec"]["layers"] == 5
    dense = rows["dense"]["params"]
    assert rows["width-norec"]["params"] < dense and rows["depth+width-norec"]["params"] < dense
