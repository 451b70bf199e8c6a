"""The layout of each supported model family: one table, `FAMILIES`, that stage code asks.

Where the layers, norms, attention, MLP, embedding, rotary embedding and head of a decoder-only family live,
and what a decoder layer computes before its residual adds (see `Family`). `family_of(model)` gives a loaded
model's row and refuses a family the table lacks; `get_attr(obj, path)` follows one of its dotted paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class Family:
    """The layout of one decoder-only family: where its pieces live and what a decoder layer computes.

    Stage code asks this table (through `family_of(model)` and `get_attr`) instead of spelling attribute paths;
    a family with another layout is one more row of `FAMILIES`. Paths are dotted attribute paths.

    Relative to the model (the `*ForCausalLM`):
      layers      the `ModuleList` of decoder layers.
      embed       the token embedding (`embed(input_ids)` -> (B, T, C)).
      embed_scale whether the decoder multiplies the embedding's output by sqrt(hidden_size) itself (Gemma 2;
                  Gemma 3's embedding module scales inside, so its row says False): see `embed_tokens`.
      final_norm  the norm after the last layer, before the head.
      rotary      the rotary embedding module: `rotary(x, position_ids)` -> (cos, sin).
      head        the output head (`Linear` hidden -> vocabulary; may share the embedding's weight).
      final_softcap  config attribute holding the final logit soft-cap (Gemma 2), None when the family has none.
      per_layer_config  config lists with one entry per layer (such as `layer_types`, the sliding/global
                  pattern) that must follow a layer removal.
      rotary_by_layer_type  whether the rotary module takes the layer's type as a third argument (Gemma 3: its
                  sliding and global layers rotate with different bases): see `rotary_for`.
      norm_offset the family's RMSNorm scales by (norm_offset + weight): 1.0 for Gemma (weights stored around 0),
                  0.0 for Llama-likes.
      gguf_arch   llama.cpp's name for the architecture (`general.architecture` of a GGUF file).

    Relative to one decoder layer:
      attn, attn_out       the attention module and its output projection.
      attn_q, attn_k, attn_v  the query/key/value projections; None where the family fuses them
      attn_qkv             into one (Phi-3: `self_attn.qkv_proj`, rows q, then k, then v).
      attn_q_norm, attn_k_norm  per-head norms of the queries and keys before the rotation (Qwen3, Gemma 3),
                           None where the family has none.
      mlp, mlp_gate, mlp_up, mlp_down  the gated MLP; mlp_gate/mlp_up are None where the family fuses them
      mlp_gate_up          into one (Phi-3: `mlp.gate_up_proj`, rows gate, then up).
      input_norm           the norm before attention.
      mlp_norm             the norm before the MLP (Llama names it `post_attention_layernorm`).
      attn_out_norm        a norm applied to the attention output before its residual add (Gemma 2/3:
                           `post_attention_layernorm`), None for Llama-likes.
      mlp_out_norm         the same for the MLP output (Gemma 2/3: `post_feedforward_layernorm`).

    So a layer computes  h = h + attn_out_norm(attn(input_norm(h)));  h = h + mlp_out_norm(mlp(mlp_norm(h)))
    with a missing norm meaning identity.
    """

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    embed_scale: bool = False
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    head: str = "lm_head"
    final_softcap: str | None = None
    per_layer_config: tuple[str, ...] = ("layer_types",)
    attn: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    attn_q: str | None = "self_attn.q_proj"
    attn_k: str | None = "self_attn.k_proj"
    attn_v: str | None = "self_attn.v_proj"
    attn_qkv: str | None = None
    attn_q_norm: str | None = None
    attn_k_norm: str | None = None
    mlp: str = "mlp"
    mlp_gate: str | None = "mlp.gate_proj"
    mlp_up: str | None = "mlp.up_proj"
    mlp_down: str = "mlp.down_proj"
    mlp_gate_up: str | None = None
    input_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    rotary_by_layer_type: bool = False
    norm_offset: float = 0.0
    gguf_arch: str = "llama"

    @property
    def post_attn_norm(self) -> str:
        """The old name of `mlp_norm` (what Llama calls the norm before the MLP)."""
        return self.mlp_norm

    @property
    def pre_norm_only(self) -> bool:
        """Whether a layer is the plain pre-norm block h + attn(norm(h)), h + mlp(norm(h)) with separate
        projections: what the FFN replacement slot and the fused ONNX attention path are written for."""
        return (self.attn_out_norm is None and self.mlp_out_norm is None and self.attn_qkv is None
                and self.mlp_gate_up is None and not self.rotary_by_layer_type and self.norm_offset == 0.0)


# model_type -> layout. Gemma 2 and 3 apply a norm to each block's output before its residual add, and their
# norm before the MLP is `pre_feedforward_layernorm` (`post_attention_layernorm` is the attention output's norm).
_GEMMA = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
              mlp_out_norm="post_feedforward_layernorm", final_softcap="final_logit_softcapping", norm_offset=1.0)
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(gguf_arch="qwen2"),
    "qwen3": Family(attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm", gguf_arch="qwen3"),
    "gemma2": Family(**_GEMMA, gguf_arch="gemma2"),
    "gemma3_text": Family(**_GEMMA, attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm",
                          rotary_by_layer_type=True, gguf_arch="gemma3"),
    "phi3": Family(attn_q=None, attn_k=None, attn_v=None, attn_qkv="self_attn.qkv_proj", mlp_gate=None, mlp_up=None,
                   mlp_gate_up="mlp.gate_up_proj", gguf_arch="phi3"),
}


# model_type of a multimodal checkpoint -> its text decoder's model_type (one of FAMILIES): slimlm compresses,
# exports and serves the text model alone (`slimlm.models.text_model_of`), and the image encoder is left behind.
MULTIMODAL: dict[str, str] = {"gemma3": "gemma3_text"}


def text_model_type(config) -> str | None:
    """The FAMILIES key a config loads as: its own model_type, or its text decoder's for a wrapper in MULTIMODAL."""
    model_type = getattr(config, "model_type", None)
    if model_type in MULTIMODAL:
        return getattr(getattr(config, "text_config", None), "model_type", None)
    return model_type


def unsupported(model_type) -> SlimlmError:
    """The one-line error for a family `FAMILIES` lacks."""
    return SlimlmError(f"unsupported architecture {model_type!r}: slimlm supports {', '.join(sorted(FAMILIES))}")


def family_of(model) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported(model_type)
    return FAMILIES[model_type]


def get_attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model) -> torch.nn.ModuleList:
    return get_attr(model, family_of(model).layers)


def embed_tokens(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the first layer: the embedding, scaled where the family's decoder scales it."""
    fam = family_of(model)
    h = get_attr(model, fam.embed)(input_ids)
    if fam.embed_scale:
        h = h * torch.tensor(model.config.hidden_size ** 0.5, dtype=h.dtype)
    return h



def final_softcap(model) -> float | None:
    """The family's final logit soft-cap (logits = cap * tanh(logits / cap); Gemma 2), None where it has none."""
    name = family_of(model).final_softcap
    cap = getattr(model.config, name, None) if name else None
    return float(cap) if cap else None


def layer_type(model, idx: int) -> str:
    """`config.layer_types[idx]` ("full_attention" or "sliding_attention"), "full_attention" where the config
    has no such list."""
    types = getattr(model.config, "layer_types", None)
    return types[idx] if types and idx < len(types) else "full_attention"


def sliding_window(model, idx: int) -> int | None:
    """The attention window of layer `idx` (keys within `window` positions of the query, the query included),
    None for a layer that attends to the whole past."""
    window = getattr(model.config, "sliding_window", None)
    if not window or layer_type(model, idx) != "sliding_attention":
        return None
    return int(window)


def layer_index(model, layer) -> int:
    """The index a decoder layer was built for (its attention's cache index): which entry of the per-layer
    config lists it follows."""
    idx = getattr(layer, "layer_idx", None)
    if not isinstance(idx, int):
        idx = getattr(get_attr(layer, family_of(model).attn), "layer_idx", 0)
    return int(idx)


def rotary_for(model, x: torch.Tensor, position_ids: torch.Tensor, idx: int):
    """(cos, sin) for decoder layer `idx` (Gemma 3's rotary module takes the layer's type)."""
    fam = family_of(model)
    rotary = get_attr(model, fam.rotary)
    if fam.rotary_by_layer_type:
        return rotary(x, position_ids, layer_type(model, idx))
    return rotary(x, position_ids)


def causal_mask(t: int, s: int, window: int | None, dtype: torch.dtype, device=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """An additive (B or 1, 1, T, S) mask for T queries at the last T of S slots: causal, within `window` keys
    of the query where given (transformers' convention: the key at distance `window` is already out), and
    with `attention_mask` (B, S) zeros masked out where given."""
    query_pos = torch.arange(t, device=device)[:, None] + (s - t)
    key_pos = torch.arange(s, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed = allowed & (query_pos - key_pos < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
