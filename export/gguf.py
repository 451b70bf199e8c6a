"""Export a (compressed) model to one GGUF file for llama.cpp and Ollama, and check it with llama.cpp.

The file is written with the `gguf` package (llama.cpp's own Python library) from the model's plain Hugging Face
form, the one `save_model` writes: every layer is a decoder layer, so any model slimlm loads exports alike.

    architecture  llama (Llama, Mistral), qwen2, qwen3, gemma2, gemma3, phi3: llama.cpp's names for the same
                  tensors (`gguf`'s own name table); for llama, the query and key rows of each head are reordered
                  from the rotate-half layout of transformers to the interleaved pairs llama.cpp's rope rotates.
                  Gemma's norm weights are stored as llama.cpp multiplies them (1 + weight); its sliding and
                  global layers are written as a per-layer pattern (`attention.sliding_window_pattern`), so a
                  compressed model whose kept layers no longer follow the family's fixed period keeps its own;
                  Phi-3's fused q/k/v and gate/up projections are llama.cpp's own layout.
    tokenizer     byte-level BPE (llama.cpp's "gpt2" model) or SentencePiece BPE with byte fallback (its "llama"
                  model: Gemma, Llama 2): every token (ids the tokenizer lacks below the embedding size become
                  unused "[PAD<id>]" tokens), merges (byte-level) or scores (SentencePiece, see
                  `_sentencepiece_pieces`), token types (added special tokens are control tokens, other added
                  tokens user-defined), bos/eos/unk/pad ids, whether bos/eos are added, the pre-tokenizer by
                  llama.cpp's name (`PRE_TOKENIZERS`) or whether a space is prefixed, the chat template.
    FFN slots     llama.cpp has no decoder layer without attention, so an FFN replacement is carried the way
                  `save_model` stores it: a layer whose attention output projection is zero, with its
                  norm and MLP. The result is exact, but that layer's attention still runs in llama.cpp:
                  its query/key/value projections, its KV cache (n_ctx x 2 x kv_heads x head_dim values) and
                  its attention over the context, all for nothing. A 7-of-30 compression (one slot) decodes
                  24 layers' worth of attention where the lean PyTorch/ONNX forms run 23.

Types: f32, f16, bf16 and q8_0 are written by `gguf` itself (1-D tensors stay f32; q8_0 rows whose length
is not a multiple of 32 stay f16). Every other type in `LLAMA_CPP_TYPES` (q4_k_m, q5_k_m, q6_k, q4_0, ...)
needs llama.cpp's quantizer, reached through llama-cpp-python (`llama_model_quantize`, fed an f32 file
written beside the output and deleted after), which chooses per tensor as llama.cpp's `llama-quantize` does.

Validation (`validate`, only when llama-cpp-python is installed; recorded as skipped otherwise): llama.cpp
loads the file, tokenizes a sample (digits, special tokens, accents) as the Hugging Face tokenizer does, and
decodes greedily from a prompt; f32/f16 must give PyTorch's greedy tokens, every type a perplexity on the
same text within `PPL_BARS` of PyTorch's. Without llama.cpp, transformers reads the file back
(`load_model('x.gguf')`), which the tests use.

Output: OUT.gguf written whole (temp file + rename), an Ollama `Modelfile` beside it (`slimlm.export.ollama`)
and OUT.gguf.json (the source's slimlm.json, the export settings, the validation).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.export.gguf_check import LLAMA_CPP_HINT, llama_cpp_available, quantize_llama_cpp, validate

WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's quantizer types that need no importance matrix (llama_ftype names, lower case)
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k")
TYPES = WRITTEN_TYPES + LLAMA_CPP_TYPES


def arch_of(model) -> tuple[str, bool]:
    """(llama.cpp's architecture, from the family table's `gguf_arch`; whether q/k rows are reordered for its
    rope: only llama.cpp's llama architecture rotates interleaved pairs)."""
    from slimlm.families import family_of

    arch = family_of(model).gguf_arch
    return arch, arch == "llama"

# tokenizer.json pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name. Split regexes as their tokenizers write them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": "ByteLevel (GPT-2 regex)", "smollm": "Digits (one by one) + ByteLevel (SmolLM)",
                  "llama-bpe": "Split (Llama 3 regex) + ByteLevel", "qwen2": "Split (Qwen2 regex) + ByteLevel"}



@dataclass
class GgufConfig:
    """What `export_gguf` does.

    type: tensor type of the file: f32 | f16 | bf16 | q8_0 (written directly) or one of `LLAMA_CPP_TYPES`
        (llama.cpp's quantizer, through llama-cpp-python).
    validate: when llama-cpp-python is installed, load the file with llama.cpp and compare it with PyTorch
        (tokenizer, greedy tokens for f32/f16/bf16, perplexity); a failure aborts the export.
    modelfile: write an Ollama `Modelfile` beside the GGUF.
    threads: threads for llama.cpp's quantizer and validation (0 = all cores).
    """

    type: str = "f16"
    validate: bool = True
    modelfile: bool = True
    threads: int = 0

    def __post_init__(self):
        self.type = str(self.type).lower()
        if self.type not in TYPES:
            raise SlimlmError(f"unknown GGUF type {self.type!r}: use one of {', '.join(TYPES)}")
        if self.threads < 0:
            raise SlimlmError(f"threads must be 0 (all cores) or more, got {self.threads}")


# --------------------------------------------------------------------------------------------------
# The plain model and its tensors


def plain_layers(model):
    """The model's decoder layers with every FFN slot replaced by its plain form (a decoder layer with zero
    attention output), as `save_model` writes it. Returns the list; the model itself is not changed."""
    from slimlm.models import FFNLayer, _ffn_to_decoder_layer, decoder_layers

    layers = list(decoder_layers(model))
    template = next((i for i, layer in enumerate(layers) if not isinstance(layer, FFNLayer)), None)
    if template is None:
        raise SlimlmError("cannot export a model made only of FFN replacements")
    return [_ffn_to_decoder_layer(model, layer, template) if isinstance(layer, FFNLayer) else layer
            for layer in layers]


def rope_reorder(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query/key projection (weight (n_head*hd, in) or bias (n_head*hd,)) from transformers' layout,
    where each head rotates dimension i with i + hd/2, to llama.cpp's, where it rotates 2j with 2j+1."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of the plain model, in order; a tied head is left out."""
    from slimlm.models import family_of

    layers_path = family_of(model).layers
    out = []
    for name, t in model.state_dict().items():
        if name.startswith(layers_path + "."):
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out.append((name, t))
    for i, layer in enumerate(plain_layers(model)):
        out.extend((f"{layers_path}.{i}.{k}", t) for k, t in layer.state_dict().items())
    return out


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every weight."""
    import gguf

    from slimlm.models import family_of

    arch, reorder = arch_of(model)
    offset = family_of(model).norm_offset
    n_layers = len(plain_layers(model))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out = []
    for name, t in hf_tensors(model):
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SlimlmError(f"tensor {name} has no llama.cpp equivalent for architecture {arch}")
        t = t.detach().to("cpu", torch.float32)
        if offset and name.endswith("norm.weight"):  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by weight
            t = t + offset
        if reorder and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = rope_reorder(t, n_head)
        elif reorder and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = rope_reorder(t, n_kv)
        out.append((new, t.contiguous()))
    return out


# --------------------------------------------------------------------------------------------------
# Metadata


def _rope(cfg, kind_of_layer: str = "full_attention") -> tuple[float, dict]:
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if kind_of_layer in rope and isinstance(rope[kind_of_layer], dict):  # Gemma 3: one entry per layer type
        rope = dict(rope[kind_of_layer])
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise SlimlmError(f"rope scaling {kind!r} is not supported by the GGUF export (default and linear are)")
    return float(theta if theta is not None else 10000.0), rope if kind == "linear" else {}


def write_model_metadata(writer, model, name: str) -> None:
    import gguf

    cfg = model.config
    arch = arch_of(model)[0]
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rotary = getattr(cfg, "partial_rotary_factor", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "partial_rotary_factor", 1.0)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(plain_layers(model)))
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(int(head_dim * float(rotary)))
    if head_dim * n_head != cfg.hidden_size or arch in ("qwen3", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta, scaling = _rope(cfg)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if arch in ("gemma2", "gemma3"):
        _gemma_metadata(writer, model, arch)
    writer.add_vocab_size(cfg.vocab_size)


def _gemma_metadata(writer, model, arch: str) -> None:
    """Soft-caps, the window, which layers slide (per layer, from `layer_types`), the sliding layers' rotary base."""
    from slimlm.families import layer_type

    cfg = model.config
    if arch == "gemma2" and getattr(cfg, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if getattr(cfg, "attn_logit_softcapping", None) and arch == "gemma3":
        raise SlimlmError("llama.cpp's gemma3 has no attention soft-cap; this model sets attn_logit_softcapping")
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(int(cfg.sliding_window))
        n = len(plain_layers(model))
        writer.add_sliding_window_pattern([layer_type(model, i) == "sliding_attention" for i in range(n)])
        writer.add_rope_freq_base_swa(_rope(cfg, "sliding_attention")[0])


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it has none slimlm knows."""
    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [p.get("type") for p in parts]
    if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
        return None
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Everything llama.cpp needs to tokenize as `tokenizer` does: {model, tokens, types, merges or scores, pre,
    special ids, flags, chat_template}. Byte-level BPE (GPT-2 style: SmolLM2, Qwen, Llama 3) is written as llama.cpp's
    "gpt2" model; SentencePiece BPE with byte fallback (Gemma, Llama 2, Mistral v0.1) as its "llama" model. Raises
    SlimlmError for a tokenizer llama.cpp would tokenize differently."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlimlmError("the GGUF export needs a fast (tokenizer.json) tokenizer")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        kind, pre = "gpt2", _pre_tokenizer_name(tj.get("pre_tokenizer"))
        if pre is None:
            raise SlimlmError("the tokenizer's pre-tokenizer has no llama.cpp equivalent slimlm knows "
                              f"({'; '.join(PRE_TOKENIZERS.values())}): {json.dumps(tj.get('pre_tokenizer'))[:200]}")
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        kind, pre = "llama", "default"
        space_prefix = _sentencepiece_prefix(tj)
    else:
        raise SlimlmError(f"the GGUF export supports byte-level BPE and SentencePiece BPE (byte fallback) tokenizers; "
                          f"this one is {model.get('type')} with a {decoder.get('type')} decoder")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for text, idx in model["vocab"].items():
        if idx >= vocab_size:
            raise SlimlmError(f"token {text!r} has id {idx}, past the model's {vocab_size} embeddings")
        tokens[idx] = text
    added = set()
    for token in tj.get("added_tokens") or []:
        idx = token["id"]
        if idx >= vocab_size:
            raise SlimlmError(f"added token {token['content']!r} has id {idx}, past the model's {vocab_size} "
                              "embeddings")
        tokens[idx] = token["content"]
        types[idx] = int(gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
        added.add(idx)
    for idx, text in enumerate(tokens):
        if text is None:
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = int(gguf.TokenType.UNUSED)
    meta = {"model": kind, "tokens": tokens, "types": types, "pre": pre}
    if kind == "gpt2":
        meta["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    else:
        meta["tokens"], meta["types"], meta["scores"] = _sentencepiece_pieces(tokens, types, added)
        meta["add_space_prefix"] = space_prefix
    probe_with, probe_without = (tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    meta.update({"add_bos": bos is not None and probe_with[:1] == [bos] and probe_without[:1] != [bos],
                 "add_eos": eos is not None and probe_with[-1:] == [eos] and probe_without[-1:] != [eos],
                 "ids": {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")},
                 "chat_template": getattr(tokenizer, "chat_template", None)})
    vocab = tokenizer.get_vocab()
    for turn_end in ("<|im_end|>", "<end_of_turn>"):
        if turn_end in vocab and turn_end in str(meta["chat_template"] or ""):
            meta["ids"]["eot"] = vocab[turn_end]
            break
    return meta


_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
SPIECE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_prefix(tj: dict) -> bool:
    """Whether a SentencePiece tokenizer.json adds a space before the text (llama.cpp's add_space_prefix); refuses a
    normalizer or pre-tokenizer llama.cpp's "llama" tokenizer does not reproduce (it only turns spaces into U+2581)."""
    norm = tj.get("normalizer") or {}
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm] if norm else []
    prefix = False
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == SPIECE:
            prefix = True
        elif not (step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == " "
                  and step.get("content") == SPIECE):
            raise SlimlmError(f"the tokenizer's normalizer has no llama.cpp equivalent: {json.dumps(norm)[:200]}")
    pre = tj.get("pre_tokenizer")
    # Gemma's: a split on " ", a no-op once the normalizer has turned every space into U+2581
    if pre and not (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "):
        if not (pre.get("type") == "Metaspace" and pre.get("replacement") == SPIECE and pre.get("split") is False):
            raise SlimlmError(f"the tokenizer's pre-tokenizer has no llama.cpp equivalent: {json.dumps(pre)[:200]}")
        prefix = prefix or pre.get("prepend_scheme") in ("always", "first")
    return prefix


def _sentencepiece_pieces(tokens: list[str], types: list[int], added: set[int]) -> tuple[list, list, list]:
    """(tokens, types, scores) as llama.cpp's "llama" tokenizer reads them (new lists). It merges the adjacent pair
    whose result has the highest score, as SentencePiece BPE does: a learned piece's score is minus its rank, pieces
    rank in id order. A SentencePiece vocabulary holds,
    in order, its control and user-defined pieces, the 256 byte pieces (<0x00>..<0xFF>), then the learned ones; the
    user-defined pieces a tokenizer.json keeps in its vocabulary (Gemma's runs of spaces, stored with U+2581) are
    marked as such again and spelled with spaces, so llama.cpp matches them whole in the text as SentencePiece does.
    Control and user-defined pieces score -1000, byte pieces 0, as llama.cpp's converter writes them."""
    import gguf

    bytes_at = [i for i, t in enumerate(tokens) if _BYTE_PIECE.match(t)]
    if len(bytes_at) != 256:
        raise SlimlmError(f"the SentencePiece vocabulary has {len(bytes_at)} byte pieces (<0x00>..<0xFF>), not 256")
    tokens, types = list(tokens), list(types)
    scores, rank = [0.0] * len(tokens), 0
    for idx, text in enumerate(tokens):
        if idx in added or types[idx] == int(gguf.TokenType.UNUSED):
            scores[idx] = -1000.0
        elif idx < bytes_at[0]:
            types[idx] = int(gguf.TokenType.USER_DEFINED)
            tokens[idx] = text.replace(SPIECE, " ")
            scores[idx] = -1000.0
        elif _BYTE_PIECE.match(text):
            types[idx] = int(gguf.TokenType.BYTE)
        else:
            scores[idx] = -float(rank)
            rank += 1
    return tokens, types, scores


def write_tokenizer_metadata(writer, meta: dict) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    if meta["model"] == "gpt2":
        writer.add_token_merges(meta["merges"])
    else:
        writer.add_token_scores(meta["scores"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, token_id in meta["ids"].items():
        if token_id is not None:
            adders[key](int(token_id))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    writer.add_add_space_prefix(bool(meta.get("add_space_prefix", False)))
    template = meta["chat_template"]
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


# --------------------------------------------------------------------------------------------------
# Writing and quantizing


def _encode(t: torch.Tensor, kind: str):
    """(numpy data, raw GGML type or None) for one tensor written as `kind` (1-D tensors always f32)."""
    import gguf

    a = t.numpy()
    if a.ndim == 1 or kind == "f32":
        return a, None
    if kind == "f16":
        return a.astype("float16"), None
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return a.astype("float16"), None  # q8_0 blocks span 32 values of a row
    return gguf.quants.quantize(a, qtype), qtype


# llama.cpp sets attributes on these tokens when a model's name says Phi-3, and fails to load one that lacks them
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _safe_name(name: str, meta: dict) -> str:
    """`general.name`, with "phi3"/"phi-3" spelled "phi_3" where the vocabulary lacks a token llama.cpp then
    looks up by name (a small or retrained tokenizer would otherwise make the file fail to load)."""
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not set(_PHI3_NAMED_TOKENS) <= set(meta["tokens"]):
        import re

        return re.sub(r"(?i)phi-?3", "phi_3", name)
    return name


def write_gguf(model, tokenizer, path: Path, kind: str, name: str, record: dict) -> None:
    """Write the model as a GGUF of type `kind` (one of WRITTEN_TYPES) to `path` (not atomic: callers use a temp)."""
    import gguf

    arch = arch_of(model)[0]
    meta = tokenizer_metadata(tokenizer, model.config.vocab_size)  # refuses an unsupported tokenizer before writing
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        write_model_metadata(writer, model, _safe_name(name, meta))
        writer.add_file_type(int(getattr(gguf.LlamaFileType, "ALL_F32" if kind == "f32" else f"MOSTLY_{kind.upper()}")))
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer_metadata(writer, meta)
        writer.add_string("slimlm.record", json.dumps(record, default=str))
        for tensor_name, t in gguf_tensors(model):
            data, raw = _encode(t, kind)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------------
# The stage


def check_gguf_out(out, force: bool, model=None, modelfile: bool = True) -> Path:
    """An output file that may be written: ends in .gguf, is not a directory, not the model, exists only with
    `force` (nor may a Modelfile of another model beside it), and its place can be created."""
    from slimlm.models import check_writable

    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise SlimlmError(f"the GGUF output must end in .gguf, got {out}")
    if out.is_dir():
        raise SlimlmError(f"{out} is a directory, not a .gguf file")
    if model is not None and Path(str(model)).expanduser().exists() and \
            Path(str(model)).expanduser().resolve() == out.resolve():
        raise SlimlmError(f"{out} is the model itself: write the output elsewhere")
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    mf = out.with_name("Modelfile")
    if modelfile and mf.exists() and not force and f"FROM ./{out.name}\n" not in _read(mf):
        raise SlimlmError(f"{mf} exists for another model (use --force to overwrite, or write elsewhere)")
    return check_writable(out)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def export_gguf(spec, out, config: GgufConfig, overwrite: bool = False, model=None, tokenizer=None) -> dict:
    """Export the model `spec` (anything `load_model` takes; or pass `model` and `tokenizer`) to the file `out`.

    Writes OUT.gguf, OUT.gguf.json and (config.modelfile) a Modelfile beside it; returns the report. Atomic:
    a failed export or validation leaves no OUT.gguf behind.
    """
    from slimlm.models import load_model, read_slimlm_json, resolve, write_file

    out = check_gguf_out(out, overwrite, spec, config.modelfile)
    if config.type in LLAMA_CPP_TYPES and not llama_cpp_available():
        raise SlimlmError(f"--type {config.type} needs llama.cpp's quantizer: {LLAMA_CPP_HINT}")
    if model is None:
        kind, where = resolve(str(spec))
        model, tokenizer = load_model(str(spec), dtype="float32", device="cpu", fused=False)
        source = read_slimlm_json(where) if kind == "dir" else {}
    else:
        source = dict(getattr(model, "slimlm_info", {}) or {})
    if getattr(model.config, "quantization_config", None) is not None:
        raise SlimlmError(f"{spec} is quantized with bitsandbytes: export the unquantized model to GGUF")
    arch = arch_of(model)[0]  # a family outside the table: its one-line refusal
    from slimlm.models import FFNLayer, decoder_layers

    ffn = [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer, FFNLayer)]
    ffn = ffn or list((source.get("architecture") or {}).get("ffn_layers") or [])
    name = Path(str(spec)).name.removesuffix(".gguf") if spec is not None else "model"
    section = {"config": asdict(config), "source_model": str(spec) if spec is not None else None,
               "file": out.name, "architecture": arch,
               "layers": len(decoder_layers(model)), "ffn_layers_as_zero_attention": ffn}
    t0 = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlimlmError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    raw = out.with_name(f".{out.name}.f32-{os.getpid()}")
    try:
        if config.type in WRITTEN_TYPES:
            write_gguf(model, tokenizer, tmp, config.type, name, {"gguf": section, **_summary(source)})
        else:
            write_gguf(model, tokenizer, raw, "f32", name, {"gguf": section, **_summary(source)})
            quantize_llama_cpp(raw, tmp, config.type, config.threads)
        section["write_s"] = round(time.perf_counter() - t0, 2)
        section["disk_bytes"] = tmp.stat().st_size
        if config.validate and llama_cpp_available():
            t1 = time.perf_counter()
            section["validation"] = validate(tmp, model, tokenizer, config.type, config.threads)
            section["validate_s"] = round(time.perf_counter() - t1, 2)
            if not section["validation"]["passed"]:
                raise SlimlmError(f"GGUF validation failed ({config.type}): "
                                  + "; ".join(section["validation"]["failures"]))
        elif config.validate:
            section["validation"] = {"skipped": f"llama-cpp-python is not installed ({LLAMA_CPP_HINT})"}
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)
    if config.modelfile:
        from slimlm.export.ollama import modelfile

        text, section["modelfile"] = modelfile(out.name, tokenizer)
        write_file(out.with_name("Modelfile"), text)
    report = {**source, "gguf": section}
    write_file(out.with_name(out.name + ".json"), json.dumps(report, indent=2, default=str) + "\n")
    return report


def _summary(source: dict) -> dict:
    """The part of the source's slimlm.json worth carrying inside the GGUF (what was removed, quality kept)."""
    keep = ("selection", "quality", "params", "architecture", "config")
    return {k: source[k] for k in keep if k in source}
