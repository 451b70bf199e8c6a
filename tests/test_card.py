"""The model card written into every output directory: Hub metadata (base model, relation, library, tags), what was
removed or quantized, the quality figures of the record, the command that made it."""

import json

import pytest
import yaml

from slimlm.card import base_model_id, command_line, model_card
from slimlm.models import save_model
from slimlm.testing import tiny_model, tiny_tokenizer

COMPRESSED = {
    "config": {"layers": 2, "method": "streamline", "replacement": "ffn"},
    "selection": {"removed_layers": [2, 3]}, "replacement": {"kind": "ffn"},
    "layers_before": 6, "layers_after": 5, "params_before": 200_000, "params_after": 150_000,
    "quality": {"heldout_windows": 4, "heldout_tokens": 2044, "ppl_dense": 12.76, "ppl_compressed": 19.09,
                "top1_agreement": 0.7099},
    "source_model": "smollm2-135m",
}
QUANTIZED = {"source_model": "org/some-model",
             "quantization": {"method": "nf4", "memory_ratio": 0.31, "config": {"method": "nf4"},
                              "perplexity": {"text": "/data/wiki.test.raw", "windows": 4, "seq_len": 256,
                                             "before": 20.0, "after": 21.0, "change": 0.05}}}


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, _, text = card[4:].partition("\n---\n")
    return yaml.safe_load(head), text


def test_compressed_card():
    meta, text = _split(model_card(COMPRESSED, "smol-5", "slimlm compress smollm2-135m -o smol-5 --layers 2"))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune"  # the Hub's value for trained derivatives; "pruned" is a tag
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"slimlm", "pruned", "layer-pruning", "streamline"} <= set(meta["tags"])
    assert "decoder layers 2, 3 (2 of 6" in text and "FFN" in text
    assert "| 12.76 |" in text and "19.09 (1.50x)" in text and "71.0%" in text
    assert "200.0K" not in text and "25.0% fewer" in text
    assert "slimlm compress smollm2-135m -o smol-5 --layers 2" in text


def test_quantized_card():
    meta, text = _split(model_card(QUANTIZED, "q", None))
    assert meta["base_model"] == "org/some-model" and meta["base_model_relation"] == "quantized"
    assert "quantized" in meta["tags"] and "nf4" in meta["tags"]
    assert "20.00 -> 21.00 (+5.0%)" in text and "31.0% of the unquantized" in text
    assert '"method": "nf4"' in text  # made from Python: the settings stand in for the command


def test_local_source_has_no_base_model(tmp_path):
    assert base_model_id(str(tmp_path)) is None  # a local directory is not a Hub id
    assert base_model_id("org/name") == "org/name"
    assert base_model_id("/root/.cache/slimlm/models/smollm2-135m-98362432") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta, _ = _split(model_card({**COMPRESSED, "source_model": str(tmp_path)}, "x"))
    assert "base_model" not in meta and "base_model_relation" not in meta


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/slimlm", "compress", "m", "-o", "out dir"], "slimlm compress m -o 'out dir'"),
    (["/x/slimlm/__main__.py", "quantize", "m"], "slimlm quantize m"),
    (["/usr/bin/pytest", "-q"], None),
])
def test_command_line(argv, expected):
    assert command_line(argv) == expected


def test_save_model_writes_the_card(tmp_path):
    out = save_model(tiny_model(layers=2), tiny_tokenizer(), tmp_path / "small", report=dict(COMPRESSED))
    meta, text = _split((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and text.startswith("\n# small\n")
    assert json.loads((out / "slimlm.json").read_text())["selection"]["removed_layers"] == [2, 3]
