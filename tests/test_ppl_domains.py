"""benchmarks/ppl_domains.py: perplexity per text and per window position, as ratios to a reference model."""

import json


def test_ratios_to_the_reference_per_text_and_position(tiny_dir, calib_file, tmp_path, bench_script):
    import torch

    from slimlm.data import read_text, token_windows
    from slimlm.evaluate import perplexity
    from slimlm.models import load_model
    from slimlm.testing import save_tiny

    compressed_dir = save_tiny(tmp_path / "other-weights", seed=7)  # another model, same tokenizer

    mod = bench_script("ppl_domains")
    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x * 2\n\n" * 400)
    out = tmp_path / "r.json"
    rc = mod.main(["--models", f"{tiny_dir},{compressed_dir}", "--texts", f"a={calib_file},b={other}",
                   "--windows", "2", "--seq-len", "128", "--json", str(out)])
    assert rc == 0
    rows = {(r["model"], r["text"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 4
    for text in ("a", "b"):
        assert rows[(str(tiny_dir), text)]["ratio"] == 1.0  # the reference against itself
        assert set(rows[(str(tiny_dir), text)]["ratio_by_position"]) == {"0-64", "64-128"}
    # the same perplexity `slimlm eval` computes, and the ratio is the quotient of the two
    model, tok = load_model(str(compressed_dir))
    w = token_windows(tok, read_text(str(calib_file)), 2, 128)
    ppl = perplexity(model, w, progress=False)["ppl"]
    row = rows[(str(compressed_dir), "a")]
    assert abs(row["ppl"] - ppl) < 1e-3 * ppl
    assert abs(row["ratio"] - ppl / rows[(str(tiny_dir), "a")]["ppl"]) < 1e-3
    assert torch.isfinite(torch.tensor(row["ratio"])) and row["ratio"] != 1.0
