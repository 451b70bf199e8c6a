"""`slimlm bench pareto` end to end on a tiny model with two layer counts, and the frontier rule."""

import json

import pytest

from slimlm.compress.pareto import _frontier, main


def test_frontier_keeps_only_undominated_rows():
    rows = [{"decode_tok_s": 100, "ppl": 30}, {"decode_tok_s": 150, "ppl": 40}, {"decode_tok_s": 120, "ppl": 45},
            {"decode_tok_s": 150, "ppl": 40.5}, {"decode_tok_s": 90, "ppl": 29}, {"decode_tok_s": None, "ppl": 10}]
    _frontier(rows)
    assert [r["frontier"] for r in rows] == [True, True, False, False, True, False]


def test_pareto_bench_end_to_end(tiny_dir, calib_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"instruction": "Name a city."}\n{"instruction": "Boil water?"}\n')
    out, png = tmp_path / "pareto.json", tmp_path / "pareto.png"
    rc = main(["--model", str(tiny_dir), "--layers", "0,2", "--width", "0.2,2:0.1", "--forms", "ort-int8",
               "--ppl", str(calib_file),
               "--windows", "2", "--seq-len", "32", "--prefill", "16", "--decode", "8", "--repeats", "1",
               "--chat", str(chat), "--chat-max-tokens", "8", "--work", str(tmp_path / "work"),
               "--compress-option", f"calib={calib_file}", "--compress-option", "calib_samples=4",
               "--compress-option", "seq_len=16", "--compress-option", "epochs=1", "--compress-option", "kd_epochs=0",
               "--compress-option", "recover_steps=2", "--compress-option", "recover_tokens=32",
               "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    rows = summary["results"]
    assert [(r["model"], r["layers_removed"], r["width_ratio"]) for r in rows] == [
        ("dense", 0, None), ("-2 layers", 2, None), ("width 0.2", 0, 0.2), ("-2 layers + width 0.1", 2, 0.1)]
    assert all(r["backend"] == "ort-int8" and "key" not in r for r in rows)
    assert all(r["params"] < rows[0]["params"] for r in rows[1:]) and rows[3]["params"] < rows[1]["params"]
    assert all(r["runs"] == 1 and not r["errors"] and "decode_tok_s" in r and r["ppl"] > 0 for r in rows)
    assert all(r["chat"]["n"] == 2 and r["chat"]["reference_nll"] > 0 for r in rows)
    assert any(r["frontier"] for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the compressed point (same options): no recompression
    assert (tmp_path / "work" / "layers-2" / "slimlm.json").is_file()
    assert (tmp_path / "work" / "width-2-0.1" / "slimlm.json").is_file()


def test_pareto_bad_input_is_one_line(tiny_dir, calib_file, tmp_path):
    from slimlm.errors import SlimlmError

    for extra, message in ((["--layers", "0,x"], "--layers takes"), (["--forms", "ort-magic"], "unknown forms"),
                           (["--compress-option", "warp=9"], "--compress-option takes"),
                           (["--width", "1.5"], "--width ratios"), (["--width", "a:b"], "--width takes")):
        with pytest.raises(SlimlmError, match=message):
            main(["--model", str(tiny_dir), "--ppl", str(calib_file), *extra])
