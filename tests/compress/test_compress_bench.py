"""`slimlm bench compress` end to end on the tiny model: rows, the text row's calibration, the summary file."""

import json


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
