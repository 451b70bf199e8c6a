"""Tiny random models for tests and examples: no download, seconds to build.

`tiny_model(family)` builds a random model of a supported family from a config; `tiny_tokenizer()`
trains a small byte-level BPE tokenizer on built-in text and gives it a chat template;
`save_tiny(path, family)` writes both as a Hugging Face directory.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model reads text and predicts the next token. "
    "Layers of a transformer refine a hidden state; some layers change it little. "
    "Question: how do you boil water? Answer: heat it in a pot until it bubbles. "
    "Once upon a time there was a small village by the sea, where fishermen sailed at dawn. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) ' \" - appear too. "
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A ~320-token byte-level BPE tokenizer (any text encodes) with a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_sentencepiece_tokenizer(prefix: bool = False):
    """A ~320-token SentencePiece-style BPE tokenizer with byte fallback, laid out as Gemma's and Llama 2's are:
    control tokens, the 256 byte pieces <0x00>..<0xFF>, then the learned pieces in merge order; spaces become U+2581
    (`prefix`: one is also put before the text, as Llama 2 does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", space)
    learner.train_from_iterator([_TEXT] * 20, trainer=trainers.BpeTrainer(vocab_size=160 + len(specials),
                                                                          show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for text, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(text, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                                                    for m in learned["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", space)
    steps = [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # as Llama 2's tokenizer.json does it: a space before the text only, not after each special token
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True)
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                          "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return fast


FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
    # a window of 8 so that tests of a dozen tokens cross it; the global layer every third, soft-caps on (Gemma 2)
    "gemma2": ("Gemma2Config", {"sliding_window": 8, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0,
                                "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 8, "query_pre_attn_scalar": 16,
                                         "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": ("Phi3Config", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}),
}
# per-layer types for the families that alternate sliding and global layers (every third layer global)
_PATTERNED = {"gemma2", "gemma3_text"}


def tiny_config(family: str = "llama", layers: int = 6, hidden: int = 64, intermediate: int = 128, vocab: int = 320,
                heads: int = 4, kv_heads: int = 2, tied: bool = True):
    import transformers

    name, extra = FAMILY_CONFIGS[family]
    if family in _PATTERNED:
        extra = {**extra, "layer_types": ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention"
                                          for i in range(layers)]}
    return getattr(transformers, name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **extra,
    )


def tiny_model(family: str = "llama", seed: int = 0, plant_redundant: tuple[int, int] | None = None, **kw):
    """A random model. `plant_redundant=(start, n)` scales the output projections of layers start..start+n-1
    down so that block barely changes the hidden state: the block streamline should pick."""
    from transformers import AutoModelForCausalLM

    from slimlm.models import decoder_layers, family_of, get_attr

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    if plant_redundant:
        start, n = plant_redundant
        with torch.no_grad():
            fam = family_of(model)
            for layer in decoder_layers(model)[start:start + n]:
                get_attr(layer, fam.attn_out).weight.mul_(0.01)
                get_attr(layer, fam.mlp_down).weight.mul_(0.01)
    return model.eval()


def save_tiny(path, family: str = "llama", **kw) -> Path:
    model = tiny_model(family, **kw)
    tok = tiny_tokenizer()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def save_tiny_multimodal(path, layers: int = 6) -> Path:
    """A random multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`: a one-layer image encoder before
    the tiny `gemma3_text` decoder of `tiny_config`), as a user's Gemma 3 4B directory is laid out."""
    import transformers

    text = tiny_config("gemma3_text", layers=layers)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=300, boi_token_index=301, eoi_token_index=302)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)
