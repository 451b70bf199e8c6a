"""bitsandbytes quantization of tiny dense and compressed models: round trip through load_model, CLI errors."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

import slimlm
from slimlm.cli import main
from slimlm.export.bnb import QuantConfig, quantize, quiet_bnb
from slimlm.models import FFNLayer

# Cosine similarity of logits to the fp32 model. int8 keeps fp16-rounded activations and int8 rows with
# outliers in fp16: the bar is 0.99. 4-bit weights of a random tiny model measure ~0.98 here, so the
# 4-bit bar is set just below that: a broken path (wrong scales, unquantized layers mixed up) falls far lower.
MIN_COSINE = {"int8": 0.99, "nf4": 0.95, "fp4": 0.95}


def _logits(model, ids):
    with torch.no_grad(), quiet_bnb():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_quantize_round_trip(model_dir, method, token_ids, tmp_path):
    ref, _ = slimlm.load_model(str(model_dir))
    out = tmp_path / method
    report = quantize(str(model_dir), out, QuantConfig(method=method))
    model, _ = slimlm.load_model(str(out))
    cos = torch.nn.functional.cosine_similarity(_logits(model, token_ids).flatten(), _logits(ref, token_ids).flatten(),
                                                dim=0)
    assert cos >= MIN_COSINE[method], f"{method}: cosine {cos:.4f}"
    # the replacement FFN is kept lean and quantized too
    ffn_slots = [i for i, layer in enumerate(model.model.layers) if isinstance(layer, FFNLayer)]
    assert ffn_slots == [i for i, layer in enumerate(ref.model.layers) if isinstance(layer, FFNLayer)]
    for i in ffn_slots:
        assert type(model.model.layers[i].ffn.up_proj) is not torch.nn.Linear
    saved = json.loads((out / "slimlm.json").read_text())
    q = saved["quantization"]
    assert q["method"] == method and q == report["quantization"]
    assert q["after"]["memory_bytes"] < q["before"]["memory_bytes"]
    assert q["after"]["disk_bytes"] < q["before"]["disk_bytes"]
    assert saved["architecture"]["ffn_layers"] == ffn_slots


def test_quantize_perplexity_recorded(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    report = quantize(str(tiny_dir), tmp_path / "q", QuantConfig(method="int8", ppl_text=str(text), ppl_windows=2,
                                                                  ppl_seq_len=64))
    p = report["quantization"]["perplexity"]
    assert p["windows"] == 2 and p["before"] > 1 and abs(p["change"]) < 0.05


def test_quantize_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--method", "nf4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "slimlm.json").read_text())["quantization"]["method"] == "nf4"
    # refuses to overwrite, then overwrites with --force
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--method", "int8"]) == 2
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--method", "int8", "--force"]) == 0
    assert json.loads((out / "slimlm.json").read_text())["quantization"]["method"] == "int8"


@pytest.mark.parametrize("case", ["missing model", "unknown method", "unwritable out"])
def test_quantize_bad_input(tiny_dir, tmp_path, capsys, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out" if case == "unwritable out" else tmp_path / "out"
    model = str(tmp_path / "nope") if case == "missing model" else str(tiny_dir)
    method = "int3" if case == "unknown method" else "int8"
    assert main(["quantize", model, "-o", str(out), "--method", method]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimlm: error:")
    assert not out.exists()


def test_quantize_error_is_one_line_in_a_fresh_process(tiny_dir, tmp_path):
    """bitsandbytes' import logs a warning on AVX512-BF16 CPUs without the `kernels` package: not on slimlm's stderr."""
    import subprocess
    import sys

    (tmp_path / "empty.txt").write_text(" \n")
    proc = subprocess.run([sys.executable, "-m", "slimlm", "quantize", str(tiny_dir), "-o", str(tmp_path / "out"),
                           "--ppl", str(tmp_path / "empty.txt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is empty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_quantize_perplexity_beyond_the_model_context_is_refused(tiny_dir, tmp_path, capsys, calib_file):
    assert main(["quantize", str(tiny_dir), "-o", str(tmp_path / "out"), "--ppl", str(calib_file),
                 "--seq-len", "4096"]) == 2
    assert "--seq-len 4096 is longer than the model's context" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
