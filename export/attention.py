"""Fused attention for the ONNX graph: onnxruntime's `GroupQueryAttention` and `RotaryEmbedding` contrib ops.

Traced as transformers writes it, one attention layer of a Llama-family model becomes ~45 small ONNX nodes (the
rotary rotate-half, the repeat of the key/value heads, transposes, the past concatenation, the masked softmax).
At batch 1 a decode step of a small model is as much node dispatch as arithmetic, so `export_onnx` (by default,
`attention="auto"`, for every weight type but fp16) traces each attention layer through two PyTorch custom ops
instead, exported as:

    com.microsoft.RotaryEmbedding   q and k, (B, T, heads * head_dim), from a cos/sin table of the model's own
                                    rotary embedding (position_ids select the rows, so left padding works)
    com.microsoft.GroupQueryAttention  causal attention of the rotated q over past + new k/v, grouped heads,
                                    padding from the attention mask as an additive bias; returns the output
                                    and the present key/value (B, kv_heads, P + T, head_dim)

The graph's inputs and outputs are unchanged. Each custom op has a PyTorch implementation (used when the module
runs eagerly, for the shape trace, and checked against transformers' own attention in the tests).

Limits, as onnxruntime states them: with a past, T > 1 needs batch 1 (prefill of a batch starts from an empty
past; decode steps have T = 1: what `OnnxCausalLM` and the server do), and positions must stay below the table
size (`max_positions`, the model's `max_position_embeddings`, capped at `MAX_POSITIONS`). Sliding-window
attention (Mistral's `sliding_window`) is not applied, as in the plain export: both are exact up to the window.
"""

from __future__ import annotations

import torch

MAX_POSITIONS = 32768
# rotary variants whose cos/sin do not depend on the sequence length: a fixed table is exact for them
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def supported(model) -> str | None:
    """None when every attention layer of `model` can take the fused path, else why not."""
    from slimlm.models import FFNLayer, decoder_layers, family_of, get_attr

    if _rope_type(model.config) not in STATIC_ROPE:
        return f"rotary type {_rope_type(model.config)!r} depends on the sequence length"
    fam = family_of(model)
    if not fam.pre_norm_only:
        return f"the fused path takes plain pre-norm layers with separate projections, not {model.config.model_type}'s"
    parts = (fam.attn_q, fam.attn_k, fam.attn_v, fam.attn_out, fam.input_norm, fam.mlp_norm, fam.mlp)
    for layer in decoder_layers(model):
        if isinstance(layer, FFNLayer):
            continue
        try:
            for path in parts:
                get_attr(layer, path)
        except AttributeError:
            return f"{type(layer).__name__} is not a pre-norm decoder layer with q/k/v/o projections"
    return None


# --------------------------------------------------------------------------------------------------
# Custom ops: PyTorch implementations


@torch.library.custom_op("slimlm::rotary", mutates_args=())
def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, T, num_heads * D) at position_ids (B, T); cos/sin: (positions, D/2)."""
    b, t, _ = x.shape
    xh = x.view(b, t, num_heads, -1)
    half = xh.shape[-1] // 2
    c, s = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = xh[..., :half], xh[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).reshape(b, t, -1)


@rotary.register_fake
def _(x, position_ids, cos, sin, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("slimlm::gqa", mutates_args=())
def gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
        bias: torch.Tensor, seqlens: torch.Tensor, total: torch.Tensor, num_heads: int, kv_heads: int, scale: float
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention. q (B, T, H*D), k/v (B, T, KV*D), past_k/v (B, KV, P, D), bias: additive
    (B, 1, T, P+T) for left padding; seqlens (B,) int32: the index of each row's last valid slot (P+T-1 for a full
    or left-padded row, n-1 for a row whose n valid slots come first, "right padding"), total () int32 = P+T, as
    onnxruntime's op takes them (computed once per graph, not per layer). Row r's new keys/values are written at
    seqlens[r]-T+1.., right after its valid past, and its queries see slots 0..seqlens[r] only, so a right-padded
    row is computed exactly as it would be alone. Returns out (B, T, H*D), present_k/v (B, KV, P+T, D); slots past
    a row's seqlens hold zeros here (onnxruntime leaves them unspecified)."""
    b, t, _ = q.shape
    d = past_k.shape[-1]
    p = past_k.shape[2]
    new_k, new_v = k.view(b, t, kv_heads, d).transpose(1, 2), v.view(b, t, kv_heads, d).transpose(1, 2)
    key = torch.cat([past_k, torch.zeros_like(new_k)], dim=2)
    value = torch.cat([past_v, torch.zeros_like(new_v)], dim=2)
    starts = (seqlens.long() - t + 1).clamp(min=0, max=p)  # (B,) valid past per row
    slots = torch.arange(p + t, device=q.device)
    for r in range(b):
        n = int(starts[r])
        key[r, :, n + t:], value[r, :, n + t:] = 0, 0
        key[r, :, n:n + t], value[r, :, n:n + t] = new_k[r], new_v[r]
    qh = q.view(b, t, num_heads, d).transpose(1, 2)  # (B, H, T, D)
    rep = num_heads // kv_heads
    kh, vh = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(qh, kh.transpose(2, 3)) * scale + bias
    # query i of row r sits at slot starts[r] + i and sees slots up to it
    hidden = slots[None, None, :] > starts[:, None, None] + torch.arange(t, device=q.device)[None, :, None]
    scores = scores.masked_fill(hidden[:, None], torch.finfo(scores.dtype).min)
    out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vh)
    return out.transpose(1, 2).reshape(b, t, num_heads * d), key, value


@gqa.register_fake
def _(q, k, v, past_k, past_v, bias, seqlens, total, num_heads, kv_heads, scale):
    b, t, _ = q.shape
    kv, p, d = past_k.shape[1], past_k.shape[2], past_k.shape[3]
    present = past_k.new_empty(b, kv, p + t, d)
    return torch.empty_like(q), present, torch.empty_like(present)


# --------------------------------------------------------------------------------------------------
# Their ONNX translations (onnxscript), for torch.onnx.export(custom_translation_table=...)


def _register_ort_schema(name: str, domain: str = "com.microsoft") -> None:
    """Make onnxruntime's contrib op `name` known to onnx's schema registry (where onnxscript looks ops up),
    copied from the schema onnxruntime itself reports."""
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    if onnx.defs.has(name, domain):
        return
    src = next(s for s in C.get_all_operator_schema() if s.name == name and s.domain == domain)
    S = onnx.defs.OpSchema
    option = {"Single": S.FormalParameterOption.Single, "Optional": S.FormalParameterOption.Optional,
              "Variadic": S.FormalParameterOption.Variadic}

    def param(p):
        return S.FormalParameter(p.name, p.typeStr, p.description, param_option=option[p.option.name])

    attrs = [S.Attribute(a.name, S.AttrType[a.type.name], a.description, required=a.required)
             for a in src.attributes.values()]
    types = [(t.type_param_str, list(t.allowed_type_strs), t.description) for t in src.type_constraints]
    onnx.defs.register_schema(S(name, domain, src.since_version, src.doc or "", inputs=[param(p) for p in src.inputs],
                                outputs=[param(p) for p in src.outputs], type_constraints=types, attributes=attrs))


def translations() -> dict:
    import onnxscript

    for name in ("RotaryEmbedding", "GroupQueryAttention"):
        _register_ort_schema(name)
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def rotary_onnx(x, position_ids, cos, sin, num_heads: int):
        return msft.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, num_heads=num_heads)

    def gqa_onnx(q, k, v, past_k, past_v, bias, seqlens, total, num_heads: int, kv_heads: int, scale: float):
        outs = msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens, total, None, None, None, bias,
                                        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale)
        return outs[0], outs[1], outs[2]

    return {torch.ops.slimlm.rotary.default: rotary_onnx, torch.ops.slimlm.gqa.default: gqa_onnx}


def trim_unused_outputs(model_proto) -> None:
    """Drop GroupQueryAttention's trailing optional output (the QK scores): onnxscript names every output of the
    schema, and onnxruntime refuses a named QK output unless `qk_output` is set."""
    used = {name for node in model_proto.graph.node for name in node.input}
    used |= {o.name for o in model_proto.graph.output}
    for node in model_proto.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            while len(node.output) > 3 and node.output[-1] not in used:
                node.output.pop()


# --------------------------------------------------------------------------------------------------
# The fused decoder layer


class RotaryTable(torch.nn.Module):
    """cos/sin rows (positions, D/2) of the model's own rotary embedding (its scaling included)."""

    def __init__(self, model, head_dim: int):
        super().__init__()
        n = min(int(getattr(model.config, "max_position_embeddings", 0) or 4096), MAX_POSITIONS)
        from slimlm.models import family_of, get_attr

        rotary_emb = get_attr(model, family_of(model).rotary)
        probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary_emb(probe, torch.arange(n)[None])
        self.register_buffer("cos", cos[0, :, : head_dim // 2].float().contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, : head_dim // 2].float().contiguous(), persistent=False)
        self.positions = n


def layer_forward(layer, h, position_ids, table: RotaryTable, bias, seqlens, total, past_k, past_v, num_heads: int,
                  kv_heads: int, head_dim: int, family=None):
    """One pre-norm decoder layer with the fused attention; returns (h, present_k, present_v). `family`: the
    model's `Family` row (default: the Llama layout)."""
    from slimlm.models import FAMILIES, get_attr

    fam = family or FAMILIES["llama"]
    attn = get_attr(layer, fam.attn)
    b, t, _ = h.shape
    x = get_attr(layer, fam.input_norm)(h)
    q, k, v = get_attr(layer, fam.attn_q)(x), get_attr(layer, fam.attn_k)(x), get_attr(layer, fam.attn_v)(x)
    if fam.attn_q_norm is not None:  # Qwen3: RMSNorm per head before the rotation
        q = get_attr(layer, fam.attn_q_norm)(q.view(b, t, num_heads, head_dim)).view(b, t, -1)
        k = get_attr(layer, fam.attn_k_norm)(k.view(b, t, kv_heads, head_dim)).view(b, t, -1)
    cos, sin = table.cos.to(q.dtype), table.sin.to(q.dtype)
    q = torch.ops.slimlm.rotary(q, position_ids, cos, sin, num_heads)
    k = torch.ops.slimlm.rotary(k, position_ids, cos, sin, kv_heads)
    out, present_k, present_v = torch.ops.slimlm.gqa(q, k, v, past_k, past_v, bias, seqlens, total, num_heads,
                                                     kv_heads, float(attn.scaling))
    h = h + get_attr(layer, fam.attn_out)(out)
    h = h + get_attr(layer, fam.mlp)(get_attr(layer, fam.mlp_norm)(h))
    return h, present_k, present_v
