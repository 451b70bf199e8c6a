"""Trace a (compressed) decoder to an ONNX graph with a KV cache.

The graph is traced with the `torch.export`-based exporter (`torch.onnx.export(..., dynamo=True)`) from
`DecoderWithPast`, a thin module around the loaded model that takes the cache as flat tensors:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{j}.key / .value (B, kv_heads, P, head_dim) float
    outputs  logits (B, T, V) float, present.{j}.key / .value (B, kv_heads, P+T, head_dim) float

with B, T and P dynamic (P = 0 works, so one graph does prefill and decode). With `fused` attention each attention
layer is traced through onnxruntime's fused GroupQueryAttention and RotaryEmbedding ops
(`slimlm.export.attention`); "plain" traces the decoder layers as transformers wrote them (their attention reads
and extends the cache through a small cache object). An FFN replacement (`FFNLayer`) runs only its FFN through the
PyTorch reference path, so it has no attention and no cache in the graph at all: j counts only the layers that keep
attention. Where the embedding, final norm, rotary embedding and head live comes from the family table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slimlm.errors import SlimlmError, require

if TYPE_CHECKING:
    from slimlm.export.onnx import OnnxConfig

# An optional graph input: logits are computed for the last `logits_to_keep` positions only (its default, an
# initializer of the same name, keeps every position). Generation needs one row of logits after a prompt; the head
# over every prompt position is a quarter of a short prompt's prefill on a 49k vocabulary, more on larger ones.
LOGITS_TO_KEEP = "logits_to_keep"
KEEP_ALL = 1 << 62
# protobuf cannot hold a single file over 2 GiB: larger graphs keep their weights in external data beside it
EXTERNAL_DATA_BYTES = 1 << 30


class _FlatCache:
    """Just enough of a transformers `Cache` for the attention layers: concatenates past and new keys."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):  # key, value: (B, kv_heads, T, head_dim)
        past_key, past_value = self.past[layer_idx]
        key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notes to its own developers (torchvision ops it skips, dims it renames, pytree
    deprecations, the optimizer's INFO lines) are not the user's business: hidden unless SLIMLM_DEBUG is set.
    Errors still raise."""
    if os.environ.get("SLIMLM_DEBUG"):
        yield
        return
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


class DecoderWithPast(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, past) -> (logits, present), past/present as lists of
    (key, value) for the layers that keep attention, in order."""

    def __init__(self, model, fused: bool = False):
        super().__init__()
        from slimlm.models import FFNLayer, decoder_layers, family_of, get_attr, with_cache

        self.model = model
        self.family = family_of(model)
        self.fused = fused
        if fused:
            from slimlm.export.attention import RotaryTable

            self.kv_heads, self.head_dim = kv_shape(model.config)
            self.num_heads = model.config.num_attention_heads
            self.rotary = RotaryTable(model, self.head_dim)
        self.layers = decoder_layers(model)
        self.kv_layers = [i for i, layer in enumerate(self.layers) if not isinstance(layer, FFNLayer)]
        self.is_ffn = [isinstance(layer, FFNLayer) for layer in self.layers]
        self.cache_arg = next(iter(with_cache(self.layers[self.kv_layers[0]], None))) if self.kv_layers else None
        # The output head as its own (C, V) weight, even when tied to the embedding: the graph then has a MatMul
        # with a constant weight that onnxruntime's int4/int8 quantizers take (a Transpose of the shared
        # embedding would be left in fp32, and it is the largest matrix of a small model).
        head = get_attr(model, self.family.head)
        self.head_weight = torch.nn.Parameter(head.weight.detach().t().contiguous().clone(), requires_grad=False)
        self.head_bias = getattr(head, "bias", None)
        self.final_norm = get_attr(model, self.family.final_norm)
        cap = self.family.final_softcap
        self.softcap = getattr(model.config, cap, None) if cap else None

    def forward(self, input_ids, attention_mask, position_ids, past):
        from slimlm.families import causal_mask, layer_type, rotary_for, sliding_window
        from slimlm.models import embed_tokens

        h = embed_tokens(self.model, input_ids)  # (B, T, C)
        if self.fused:
            h, present = self._layers_fused(h, attention_mask, position_ids, past)
            return self._head(h), present
        t, s = input_ids.shape[1], attention_mask.shape[1]
        masks, ropes = {}, {}  # one per window and per rotary table (Gemma: sliding and global layers)
        cache = _FlatCache({i: past[j] for j, i in enumerate(self.kv_layers)})
        for i, (layer, is_ffn) in enumerate(zip(self.layers, self.is_ffn)):
            if is_ffn:
                h = layer.ffn(h)
                continue
            window, kind = sliding_window(self.model, i), layer_type(self.model, i)
            if window not in masks:
                masks[window] = causal_mask(t, s, window, h.dtype, h.device, attention_mask)
            if kind not in ropes:
                ropes[kind] = rotary_for(self.model, h, position_ids, i)
            h = layer(h, attention_mask=masks[window], position_ids=position_ids, position_embeddings=ropes[kind],
                      **{self.cache_arg: cache})
        return self._head(h), [cache.present[i] for i in self.kv_layers]

    def _head(self, h):
        logits = torch.matmul(self.final_norm(h), self.head_weight)  # (B, T, V)
        logits = logits if self.head_bias is None else logits + self.head_bias
        if self.softcap:  # the family's final logit soft-cap (Family.final_softcap)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layers_fused(self, h, attention_mask, position_ids, past):
        from slimlm.export.attention import layer_forward

        t = h.shape[1]
        # padding as an additive bias (B, 1, T, S); causality is the attention op's own. Half the dtype's minimum:
        # a score added to it stays finite, so a query with only padding before it gets a finite (unused) output.
        bias = (1 - attention_mask[:, None, None, :].to(h.dtype)) * (torch.finfo(h.dtype).min / 2)
        bias = bias.expand(-1, -1, t, -1)
        # onnxruntime's attention wants each row's last valid slot and the total length. A left-padded (or full) row
        # ends at slot P+T-1; a right-padded row (its valid slots first: what OnnxCausalLM lays out, so that a
        # row's arithmetic does not depend on the rows beside it) ends at its own length - 1, and the op writes its
        # new keys and values right after its valid past.
        slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        seqlens = (attention_mask * slots[None, :]).amax(-1).to(torch.int32)  # (B,)
        total = torch.ones_like(attention_mask).sum(-1).to(torch.int32).max()
        present, j = [], 0
        for layer, is_ffn in zip(self.layers, self.is_ffn):
            if is_ffn:
                h = layer.ffn(h)
                continue
            h, key, value = layer_forward(layer, h, position_ids, self.rotary, bias, seqlens, total, past[j][0],
                                          past[j][1], self.num_heads, self.kv_heads, self.head_dim, self.family)
            present.append((key, value))
            j += 1
        return h, present


def kv_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of a model config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def input_names(n_kv: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{j}.{kind}" for j in range(n_kv) for kind in ("key", "value")]


def output_names(n_kv: int) -> list[str]:
    return ["logits"] + [f"present.{j}.{kind}" for j in range(n_kv) for kind in ("key", "value")]


def _example(config, n_kv: int, dtype: torch.dtype, batch: int = 2, seq: int = 5, past: int = 3):
    """Example inputs for tracing: sizes >= 2 so that torch.export keeps every dynamic dimension symbolic."""
    kv_heads, head_dim = kv_shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    # distinct tensors for every key and value: the tracer would tie inputs that are one object
    cache = [tuple(torch.randn(batch, kv_heads, past, head_dim).to(dtype) for _ in "kv") for _ in range(n_kv)]
    return ids, mask, pos, cache


def add_logits_to_keep(path: Path) -> None:
    """Insert `LOGITS_TO_KEEP` (int64 [1], default: all positions) into the ONNX file at `path`: the output head's
    input is sliced to the last that many positions along the sequence axis before the head MatMul
    (`DecoderWithPast.head_weight`). After the graph passes: onnxscript's optimizer folds an input with a default
    into a constant."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    at, head = next((i, n) for i, n in enumerate(graph.node)
                    if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] == "head_weight")
    hidden = head.input[0]
    names = {k: f"{LOGITS_TO_KEEP}/{k}" for k in ("start", "end", "axis", "kept")}
    graph.initializer.extend([numpy_helper.from_array(np.array([KEEP_ALL], np.int64), LOGITS_TO_KEEP),
                              numpy_helper.from_array(np.array([KEEP_ALL], np.int64), names["end"]),
                              numpy_helper.from_array(np.array([1], np.int64), names["axis"])])
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    nodes = [helper.make_node("Neg", [LOGITS_TO_KEEP], [names["start"]], name=f"{LOGITS_TO_KEEP}/Neg"),
             helper.make_node("Slice", [hidden, names["start"], names["end"], names["axis"]], [names["kept"]],
                              name=f"{LOGITS_TO_KEEP}/Slice")]
    for node in reversed(nodes):
        graph.node.insert(at, node)
    head.input[0] = names["kept"]
    onnx.save(proto, str(path))


def _rename_dims(path: Path) -> None:
    """Give the dynamic axes of the graph's inputs and outputs the names ONNX Runtime users expect."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length"}
    for value in [*model.graph.input, *model.graph.output]:
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.dim_param:
                continue
            if value.name == "logits" and d == 1:  # the sequence, or the last `logits_to_keep` of it
                dim.dim_param = "logits_length"
            elif dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
            elif value.name == "attention_mask" or (value.name.startswith("present.") and d == 2):
                dim.dim_param = "total_sequence_length"
    onnx.save(model, str(path))


def save_onnx(model_proto, path: Path) -> None:
    import onnx

    large = model_proto.ByteSize() > EXTERNAL_DATA_BYTES if hasattr(model_proto, "ByteSize") else True
    onnx.save_model(model_proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def trace(model, path: Path, config: OnnxConfig) -> dict:
    """Export `model` (a loaded causal LM, fp32 on CPU) to `path`; return what the graph looks like."""
    require("onnxscript", "onnx")
    require("onnx", "onnx")
    from slimlm.export.attention import translations
    from slimlm.models import set_ffn_impl

    set_ffn_impl(model, "reference")  # the replacement FFN exports through its PyTorch reference path
    # sdpa traces to one attention pattern; it cannot soft-cap attention scores (Gemma 2), which eager can
    model.config._attn_implementation = "eager" if getattr(model.config, "attn_logit_softcapping", None) else "sdpa"
    fused = use_fused(model, config)
    decoder = DecoderWithPast(model, fused=fused).eval()
    n_kv = len(decoder.kv_layers)
    dtype = torch.float16 if config.weights == "fp16" else torch.float32
    if dtype != torch.float32:  # convert a copy: the caller's fp32 model stays the validation reference
        import copy

        decoder = copy.deepcopy(decoder).to(dtype)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
                      [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n_kv)])
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(decoder, _example(model.config, n_kv, dtype), dynamo=True,
                                        opset_version=config.opset, input_names=input_names(n_kv),
                                        output_names=output_names(n_kv), dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=translations() if fused else None,
                                        optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; say which model and why in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"ONNX export failed: {type(exc).__name__}: {msg}") from exc
    proto = program.model_proto
    if fused:
        from slimlm.export.attention import trim_unused_outputs

        trim_unused_outputs(proto)
    save_onnx(proto, path)
    _rename_dims(path)
    return {"kv_layers": decoder.kv_layers, "seconds": round(time.perf_counter() - t0, 2), "n_kv": n_kv,
            "attention": "fused" if fused else "plain",
            "max_positions": decoder.rotary.positions if fused else None}


def use_fused(model, config: OnnxConfig) -> bool:
    """Whether `trace` takes the fused attention path; "fused" on a model that cannot is an error."""
    from slimlm.export.attention import supported

    if config.attention == "plain" or (config.attention == "auto" and config.weights == "fp16"):
        return False
    why = supported(model)
    if why and config.attention == "fused":
        raise SlimlmError(f"fused attention is not available for this model: {why} (use --attention plain)")
    return why is None
