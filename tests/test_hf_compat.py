"""Tokenizer files that transformers 4.x reads too: what 4.x needs in tokenizer_config.json (a class it has, extra
special tokens as a list under the key it reads), and that 5.x reads the rewritten files exactly as before. With
SLIMLM_TF4_PYTHON pointing at a Python that has transformers 4.x, that Python loads a saved directory and must give
the same token ids and logits."""

import json
import os
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.hf_compat import compat_tokenizer_config, tokenizer_compat
from slimlm.models import save_model
from slimlm.testing import tiny_model, tiny_tokenizer

# tokenizer_config.json classes transformers 4.57 resolves (its generic class and the family classes it names)
CLASSES_4X_KNOWS = {"PreTrainedTokenizerFast", "GPT2TokenizerFast", "LlamaTokenizerFast", "Qwen2TokenizerFast"}
TEXT = "Hello <|im_start|>user\nhow are you 123?<|im_end|>\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = tiny_tokenizer()
    out = tmp_path_factory.mktemp("compat") / "out"
    save_model(tiny_model(layers=2), tok, out, report={})
    return out, tok


def test_saved_config_names_what_4x_has(saved):
    out, _ = saved
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] in CLASSES_4X_KNOWS
    assert not isinstance(cfg.get("extra_special_tokens"), list)  # 4.x reads that key as a dict of named tokens


def test_5x_reads_the_rewritten_files_as_before(saved):
    out, tok = saved
    back = AutoTokenizer.from_pretrained(out)
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert (back.bos_token, back.eos_token, back.pad_token, back.unk_token) == \
        (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert back.chat_template == tok.chat_template


def test_extra_special_tokens_list_moves_to_the_key_both_read(tmp_path):
    cfg = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>", "<b>"], "bos_token": "<s>"}
    new = compat_tokenizer_config(cfg)
    assert new == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"],
                   "bos_token": "<s>"}
    assert compat_tokenizer_config({"tokenizer_class": "GPT2Tokenizer"}) == {"tokenizer_class": "GPT2Tokenizer"}
    # 5.x still sees the extra special tokens after the move
    tok = tiny_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<|endoftext|>"]})
    tok.save_pretrained(tmp_path)
    tokenizer_compat(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert "<|endoftext|>" in back.all_special_tokens


@pytest.mark.skipif(not os.environ.get("SLIMLM_TF4_PYTHON"), reason="SLIMLM_TF4_PYTHON (a transformers 4.x Python)")
def test_transformers_4x_loads_the_directory(saved):
    out, tok = saved
    code = ("import json, sys, torch, transformers; from transformers import AutoTokenizer, AutoModelForCausalLM; "
            f"t = AutoTokenizer.from_pretrained({str(out)!r}); m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"ids = t({TEXT!r})['input_ids']; "
            "print(json.dumps({'v': transformers.__version__, 'ids': ids, "
            "'logits': m(torch.tensor([ids])).logits[0].tolist()}))")
    res = subprocess.run([os.environ["SLIMLM_TF4_PYTHON"], "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["v"].startswith("4.")
    assert got["ids"] == tok(TEXT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = model(torch.tensor([got["ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, atol=1e-5, rtol=1e-5)
