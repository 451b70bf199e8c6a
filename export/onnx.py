"""Export a (compressed) decoder to ONNX with a KV cache, quantize its weights, validate it against PyTorch.

The graph is traced with the `torch.export`-based exporter (`torch.onnx.export(..., dynamo=True)`) from
`DecoderWithPast`, a thin module around the loaded model that takes the cache as flat tensors:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{j}.key / .value (B, kv_heads, P, head_dim) float
    outputs  logits (B, T, V) float, present.{j}.key / .value (B, kv_heads, P+T, head_dim) float

with B, T and P dynamic (P = 0 works, so one graph does prefill and decode). By default (`attention="auto"`)
each attention layer is traced through onnxruntime's fused GroupQueryAttention and RotaryEmbedding ops
(`slimlm.export.attention`), RMSNorms are fused by onnxscript's onnxruntime rewrites, and after weight
quantization the MatMulNBits that share an input are packed into one (`slimlm.export.graph`): a decode step of
SmolLM2-135M's compression runs ~370 nodes instead of ~1400. `attention="plain"` traces the decoder layers as
transformers wrote them (their attention reads and extends the cache through a small cache object). An FFN
replacement (`FFNLayer`) runs only its FFN through the PyTorch reference path, so it has no attention and no
cache in the graph at all: j counts only the layers that keep attention, and `slimlm.json` maps j to the
model's layer index (`onnx.kv_layers`).

Weights: "fp32" as exported; "fp16" converted before export (for the CUDA provider); "int8" and "int4"
through onnxruntime's `MatMulNBitsQuantizer`: block-wise 8-bit (round-to-nearest, asymmetric) MatMulNBits for
every weight MatMul, the output head included; or 4-bit (k-quant-fitted scales, integer zero points) with the
most sensitive matrices (by default the output head, the MLP down projections and the query/key/value
projections) kept at 8 bits; the embedding stays fp32. Why not `quantize_dynamic` for int8 and why this int4 mix: see
`quantize_int8` and `quantize_int4`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError, require

WEIGHTS = ("fp32", "fp16", "int8", "int4")
INT4_METHODS = ("kquant", "rtn", "hqq")
INT4_KEEP8 = ("head", "down_proj", "q_proj", "k_proj", "v_proj")
ATTENTION = ("auto", "fused", "plain")
MODEL_FILE = "model.onnx"
# protobuf cannot hold a single file over 2 GiB: larger graphs keep their weights in external data beside it
EXTERNAL_DATA_BYTES = 1 << 30

# Validation bars per weight type, compared with the fp32 PyTorch model on the same tokens.
# fp32: only float reassociation differs (measured ~1e-5 on the tiny models, ~1e-4 on SmolLM2-135M), so the
# bar on max |diff| is loose enough for 30 layers yet far below a real bug (which moves logits by >0.1);
# top-1 must agree everywhere and greedy tokens must be identical.
# fp16: 11-bit mantissa weights and activations. int8 / int4: the quantization error itself, measured on
# SmolLM2-135M and on random tiny models; the bars sit below those measurements with a margin, and
# far above what a broken graph gives (cosine ~0, top-1 agreement ~1/V). "min_cosine" bars the mean over
# positions of the per-position logit cosine (the minimum is recorded too).
TOLERANCES = {
    "fp32": {"max_abs_diff": 1e-2, "min_cosine": 0.99999, "min_top1": 1.0},
    "fp16": {"max_abs_diff": None, "min_cosine": 0.999, "min_top1": 0.9},
    "int8": {"max_abs_diff": None, "min_cosine": 0.98, "min_top1": 0.7},
    "int4": {"max_abs_diff": None, "min_cosine": 0.6, "min_top1": 0.5},
}
# The int4 bar follows the quality target of int4 (WikiText perplexity within ~+10% of fp32) rather than a
# logit-cosine ideal: logit cosine over a 49k vocabulary is a strict measure (the long tail moves). A broken
# graph (wrong scale, wrong layout, a past read wrongly) gives cosine ~0 and top-1 agreement ~1/V.
# Validation: past lengths checked (0 = prefill), tokens stepped after each past, greedy tokens compared.
# 16 tokens a check of ordinary prose: top-1 agreement of a quantized graph is a proportion, and over 4 tokens
# (or the first words of a text, where the model hesitates between near-equal candidates) one near-tie
# flipping is 25 points. Measured on SmolLM2-135M's 7-layer compression, int4 mix, against PyTorch fp32:
# 0.25 over 4 tokens of a 19-token pangram, 0.83-0.88 over 16 to 128 tokens of prose.
VALIDATE_PAST = (0, 1, 7, 32)
VALIDATE_STEP = 16
VALIDATE_GREEDY = 8
VALIDATE_PROMPT = (
    "The river runs for about two hundred miles from the mountains to the sea. In the nineteenth century it "
    "carried timber and grain down to the port, and several market towns grew up along its banks. Today most "
    "of the old mills are gone, but the stone bridges remain, and in summer the water is calm enough for small "
    "boats. The town museum keeps records of the great floods that shaped the valley and its farms."
)


@dataclass
class OnnxConfig:
    """What `export_onnx` does.

    weights: "fp32" | "fp16" | "int8" | "int4" (see the module docstring).
    opset: ONNX opset of the exported graph (18 and up; quantization adds `com.microsoft` ops).
    block_size: int4/int8 quantization block (power of two, 16..256; smaller is more accurate, bigger is smaller).
    int4_accuracy_level: MatMulNBits accuracy_level for int4 and int8 (4 = int8 activations per block, fastest
        on CPU; 0 = fp32 compute).
    int4_method: "kquant" (scales and integer zero points searched per block as llama.cpp's k-quants do, through
        onnxruntime's `KQuantWeightOnlyQuantConfig`: the fast int8-compute kernel), "rtn" (plain round-to-nearest:
        as fast, less accurate) or "hqq" (HQQ-fitted scales and float zero points: accurate, but onnxruntime 1.31
        runs float zero points on a slow CPU path, ~1 tok/s decode on SmolLM2-135M). See `quantize_int4`.
    int4_keep8: weight matrices kept at 8 bits in an int4 export ("kquant" and "rtn"), matched against the end of
        the PyTorch parameter name each MatMul multiplies by ("head" is the output head): the default keeps the
        head, the MLP down projections and the query/key/value projections (see `quantize_int4`). () for all
        4-bit.
    attention: "fused" (onnxruntime's GroupQueryAttention and RotaryEmbedding ops, see `slimlm.export.attention`),
        "plain" (attention traced as transformers writes it) or "auto": fused where the model allows it, except
        for fp16 (meant for the CUDA provider, where the fused op's padding bias is not verified here).
    validate: compare with PyTorch after export and fail if outside `TOLERANCES[weights]`.
    """

    weights: str = "fp32"
    opset: int = 18
    block_size: int = 32
    int4_accuracy_level: int = 4
    int4_method: str = "kquant"
    int4_keep8: tuple[str, ...] = INT4_KEEP8
    attention: str = "auto"
    validate: bool = True

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise SlimlmError(f"unknown ONNX weight type {self.weights!r}: use one of {', '.join(WEIGHTS)}")
        if not 18 <= self.opset <= 23:
            raise SlimlmError(f"opset must be between 18 and 23, got {self.opset}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise SlimlmError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.int4_method not in INT4_METHODS:
            raise SlimlmError(f"int4_method must be one of {', '.join(INT4_METHODS)}, got {self.int4_method!r}")
        self.int4_keep8 = tuple(self.int4_keep8)
        if self.int4_method == "hqq" and self.int4_keep8 not in ((), INT4_KEEP8):
            raise SlimlmError("--int4-keep8 applies to the kquant and rtn methods: hqq puts every weight at 4 bits")
        if self.attention not in ATTENTION:
            raise SlimlmError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise SlimlmError(f"int4_accuracy_level must be 0..4, got {self.int4_accuracy_level}")


# --------------------------------------------------------------------------------------------------
# The traced module


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
def _quiet_exporter():
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
        from slimlm.models import FFNLayer, decoder_layers, with_cache

        self.model = model
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
        self.head_weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().clone(),
                                              requires_grad=False)
        self.head_bias = getattr(model.lm_head, "bias", None)

    def forward(self, input_ids, attention_mask, position_ids, past):
        inner = self.model.model
        h = inner.embed_tokens(input_ids)  # (B, T, C)
        if self.fused:
            h, present = self._layers_fused(h, attention_mask, position_ids, past)
            return self._head(h), present
        position_embeddings = inner.rotary_emb(h, position_ids)
        t, s = input_ids.shape[1], attention_mask.shape[1]
        query_pos = torch.arange(t, device=h.device)[:, None] + (s - t)  # (T, 1) absolute slot of each query
        key_pos = torch.arange(s, device=h.device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)
        cache = _FlatCache({i: past[j] for j, i in enumerate(self.kv_layers)})
        for layer, is_ffn in zip(self.layers, self.is_ffn):
            if is_ffn:
                h = layer.ffn(h)
            else:
                h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings,
                          **{self.cache_arg: cache})
        return self._head(h), [cache.present[i] for i in self.kv_layers]

    def _head(self, h):
        logits = torch.matmul(self.model.model.norm(h), self.head_weight)  # (B, T, V)
        return logits if self.head_bias is None else logits + self.head_bias

    def _layers_fused(self, h, attention_mask, position_ids, past):
        from slimlm.export.attention import layer_forward

        t = h.shape[1]
        # padding as an additive bias (B, 1, T, S); causality is the attention op's own. Half the dtype's minimum:
        # a score added to it stays finite, so a query with only padding before it gets a finite (unused) output.
        bias = (1 - attention_mask[:, None, None, :].to(h.dtype)) * (torch.finfo(h.dtype).min / 2)
        bias = bias.expand(-1, -1, t, -1)
        # onnxruntime's attention wants every row's length - 1 and the total length: all rows span P+T slots
        lengths = torch.ones_like(attention_mask).sum(-1).to(torch.int32)  # (B,)
        seqlens, total = lengths - 1, lengths.max()
        present, j = [], 0
        for layer, is_ffn in zip(self.layers, self.is_ffn):
            if is_ffn:
                h = layer.ffn(h)
                continue
            h, key, value = layer_forward(layer, h, position_ids, self.rotary, bias, seqlens, total, past[j][0],
                                          past[j][1], self.num_heads, self.kv_heads, self.head_dim)
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


def _rename_dims(path: Path) -> None:
    """Give the dynamic axes of the graph's inputs and outputs the names ONNX Runtime users expect."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length"}
    for value in [*model.graph.input, *model.graph.output]:
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.dim_param:
                continue
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
            elif value.name == "attention_mask" or (value.name.startswith("present.") and d == 2):
                dim.dim_param = "total_sequence_length"
    onnx.save(model, str(path))


def _save_onnx(model_proto, path: Path) -> None:
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
    model.config._attn_implementation = "sdpa"
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
        with torch.no_grad(), _quiet_exporter():
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
    _save_onnx(proto, path)
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


# --------------------------------------------------------------------------------------------------
# Weight quantization with onnxruntime's tools


def weight_nodes(model, min_k: int) -> dict[str, list[str]]:
    """Names of the nodes that multiply by a weight matrix: MatMul whose second input is a 2-D initializer with at
    least `min_k` rows (K), and Gather from a 2-D initializer (the embedding).

    Everything else stays in float on purpose: the rotary embedding's `inv_freq @ position_ids` is also a MatMul
    with a constant operand (K = 1), and quantizing its frequencies breaks every position beyond the first few.
    """
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {"MatMul": [], "Gather": []}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(shapes.get(node.input[1], [])) == 2 and shapes[node.input[1]][0] >= min_k:
            out["MatMul"].append(node.name)
        elif node.op_type == "Gather" and len(shapes.get(node.input[0], [])) == 2:
            out["Gather"].append(node.name)
    return out


def quantize_int8(src: Path, dst: Path, block_size: int, accuracy_level: int) -> dict:
    """int8 weights, block-wise (MatMulNBits with 8 bits), activations left to the kernel (accuracy_level).

    Not `quantize_dynamic`: it quantizes each MatMul's activations per tensor, and SmolLM2-style models carry a few
    hidden dimensions with values in the thousands (the "massive activations" of the first token), which
    crush every other value to zero: measured on SmolLM2-135M, logit cosine fell to 0.3-0.9 past the first token
    (per-tensor int8 activations simulated in PyTorch: the same), while block-wise weight-only int8 keeps > 0.99.
    """
    return _quantize_nbits(src, dst, 8, block_size, accuracy_level)


def quantize_int4(src: Path, dst: Path, block_size: int, accuracy_level: int, method: str = "kquant",
                  keep8: tuple[str, ...] = INT4_KEEP8) -> dict:
    """Block-wise 4-bit MatMulNBits for the weight MatMuls, the matrices named in `keep8` at 8 bits.

    Why this mix: SmolLM2-135M is fragile under 4-bit rounding. Measured on the 7-layer streamline+ffn compression
    of SmolLM2-135M (ONNX Runtime, block 32, accuracy_level 4, first 4 WikiText-2 test windows of 1024 tokens;
    fp32 45.8): round-to-nearest int4 everywhere 65.8 (+44%); k-quant everywhere 63.6 (+39%); k-quant with the
    head at 8 bits 57.2 (+25%), and the down projections too 51.7 (+13%), and the key/value projections too
    49.4 (+8%). The query projections at 8 bits too (the default since): q/k/v then share a width, so
    `pack_matmul_nbits` makes them one MatMulNBits node a layer instead of two, and at batch 1 those small
    MatMuls cost more in per-node overhead than in bytes: first 8 windows, compressed (fp32 54.59) 58.16 ->
    56.94, dense (fp32 29.19) 32.08 -> 31.26, decode 122.5 -> 126.1 tok/s (compressed) and 90.4 -> 93.3
    (dense), medians of 6 alternating rounds in one process. Block 16 instead of 32 bought little (51.9 vs
    51.7); GPTQ (onnxruntime's, 8 windows of 512 tokens) no more than k-quant (57.1 vs 57.2 with the head at 8
    bits) after 16 minutes. HQQ is accurate but its float zero points take onnxruntime 1.31's slow CPU path (1.1
    tok/s decode against 29.8, dense, 2 threads).

    Returns how many MatMuls were quantized to each width and how many packed nodes `pack_matmul_nbits` made:
    {"int8_nodes": n, "int4_nodes": m, "packed_nodes": p}.
    """
    return _quantize_nbits(src, dst, 4, block_size, accuracy_level, method=method, keep8=keep8)


def _param_name(node) -> str:
    """The PyTorch parameter a traced MatMul multiplies by ("layers_3_mlp_down_proj", "head"), from the node
    metadata the torch.export-based exporter writes; "" when absent."""
    import re

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            found = re.search(r"%p_(\w+?)_weight\b", prop.value)
            return found.group(1) if found else ""
    return ""


def _quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, method: str = "kquant",
                    keep8: tuple[str, ...] = ()) -> dict:
    """Weight-only MatMulNBits: 8 bits through onnxruntime's default quantizer; 4 bits by `method`, the MatMuls whose
    parameter name ends with one of `keep8` at 8 bits (not for hqq). Returns the count of MatMuls per width."""
    require("onnxruntime", "onnx")
    import io

    import numpy as np
    import onnx
    from slimlm.export.graph import pack_matmul_nbits

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # its import runs logging.basicConfig(level=INFO): every later library's INFO (onnxscript's optimizer:
    # hundreds of lines per export) would reach the terminal, in this process and in a server's
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    root.handlers[:] = handlers
    root.setLevel(level)

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = onnx.load(str(src))
    keep = set(weight_nodes(model, min_k=block_size)["MatMul"])
    # nodes_to_include would widen op_types_to_quantize, not narrow it: exclude every other MatMul instead
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep]
    params = {n.name: _param_name(n) for n in model.graph.node if n.name in keep}
    wide = [] if bits != 4 or method == "hqq" else [
        name for name, param in params.items() if any(param == k or param.endswith("_" + k) for k in keep8)]
    unmatched = [k for k in keep8 if not any(p == k or p.endswith("_" + k) for p in params.values())]
    if bits == 4 and method != "hqq" and unmatched and tuple(keep8) != INT4_KEEP8:
        raise SlimlmError(f"--int4-keep8 names no weight matrix of this model: {', '.join(unmatched)} (names match the "
                          "end of a parameter name, e.g. down_proj, q_proj, or 'head')")
    common = dict(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    if method == "hqq" and bits == 4:
        quantizer = q.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude,
                                           algo_config=q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    elif bits == 4:
        algo = q.KQuantWeightOnlyQuantConfig if method == "kquant" else q.RTNWeightOnlyQuantConfig
        quantizer = q.MatMulNBitsQuantizer(
            model, **common, algo_config=algo(customized_weight_config={n: {"bits": 8} for n in wide}))
    else:
        quantizer = q.MatMulNBitsQuantizer(model, bits=bits, op_types_to_quantize=("MatMul",), **common)
    # the k-quant/RTN path prints its own progress bar, and divides by zero on constant blocks (a candidate
    # scale it then discards)
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    packed = pack_matmul_nbits(quantizer.model.model)
    _save_onnx(quantizer.model.model, dst)
    n8 = len(wide) if bits == 4 else len(keep)
    return {"int8_nodes": n8, "int4_nodes": len(keep) - n8, "packed_nodes": packed}


# --------------------------------------------------------------------------------------------------
# Validation against PyTorch


def _compare(ort_logits: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    a, b = ort_logits.float(), ref_logits.float()
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return {"max_abs_diff": float((a - b).abs().max()), "cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


@torch.no_grad()
def validate(onnx_dir: Path, model, tokenizer, weights: str) -> dict:
    """Run the exported graph and the PyTorch model on the same prompt: logits at each past length in
    VALIDATE_PAST (the past built by each runtime itself), then greedy tokens. Raises if outside tolerance."""
    from slimlm.export.runtime import OnnxCausalLM

    tol = TOLERANCES[weights]
    runner = OnnxCausalLM(onnx_dir)
    decoder = DecoderWithPast(model).eval()
    kv_heads, head_dim = kv_shape(model.config)
    ids = tokenizer(VALIDATE_PROMPT, return_tensors="pt")["input_ids"]
    need = max(VALIDATE_PAST) + VALIDATE_STEP
    if ids.shape[1] < need:
        ids = ids.repeat(1, need // ids.shape[1] + 1)
    ids = ids[:, :need]
    empty = [(torch.zeros(1, kv_heads, 0, head_dim),) * 2 for _ in decoder.kv_layers]
    checks = []
    for past_len in VALIDATE_PAST:
        step = ids[:, past_len:past_len + VALIDATE_STEP]
        total = past_len + step.shape[1]
        mask = torch.ones(1, total, dtype=torch.long)
        pos = torch.arange(past_len, total)[None]
        ref_past, ort_past = empty, None
        if past_len:
            _, ref_past = decoder(ids[:, :past_len], mask[:, :past_len], torch.arange(past_len)[None], empty)
            _, ort_past = runner.step(ids[:, :past_len], mask[:, :past_len], torch.arange(past_len)[None], None)
        ref_logits, _ = decoder(step, mask, pos, ref_past)
        ort_logits, _ = runner.step(step, mask, pos, ort_past)
        checks.append({"past_len": past_len, "tokens": int(step.shape[1]), **_compare(ort_logits, ref_logits)})
    prompt = ids[0, :VALIDATE_PAST[-1] + 1].tolist()
    ort_tokens = runner.generate(prompt, VALIDATE_GREEDY, stop_at_eos=False)
    seq = torch.tensor([prompt])
    for _ in range(VALIDATE_GREEDY):  # PyTorch greedy without any cache: the plain forward is the reference
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    ref_tokens = seq[0, len(prompt):].tolist()
    same = sum(a == b for a, b in zip(ort_tokens, ref_tokens))
    result = {"weights": weights, "tolerance": tol, "checks": checks, "greedy_tokens": VALIDATE_GREEDY,
              "greedy_match": ort_tokens == ref_tokens, "greedy_same_prefix_fraction": _prefix(ort_tokens, ref_tokens),
              "greedy_same_fraction": same / max(len(ref_tokens), 1)}
    failures = []
    for c in checks:
        if tol["max_abs_diff"] is not None and c["max_abs_diff"] > tol["max_abs_diff"]:
            failures.append(f"past {c['past_len']}: max |diff| {c['max_abs_diff']:.3g} > {tol['max_abs_diff']}")
        if c["cosine"] < tol["min_cosine"]:
            failures.append(f"past {c['past_len']}: cosine {c['cosine']:.5f} < {tol['min_cosine']}")
        if c["top1_agreement"] < tol["min_top1"]:
            failures.append(f"past {c['past_len']}: top-1 agreement {c['top1_agreement']:.2f} < {tol['min_top1']}")
    if weights == "fp32" and not result["greedy_match"]:
        failures.append(f"greedy tokens differ: onnx {ort_tokens} vs torch {ref_tokens}")
    result["passed"] = not failures
    result["failures"] = failures
    return result


def _prefix(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(b), 1)


# --------------------------------------------------------------------------------------------------
# The stage


def export_onnx(spec, out, config: OnnxConfig, overwrite: bool = False, model=None, tokenizer=None) -> dict:
    """Export the model `spec` (anything `load_model` takes; or pass `model` and `tokenizer`) to `out`.

    Writes OUT/model.onnx (+ model.onnx.data when large), config.json, generation_config.json, the
    tokenizer and slimlm.json (the source's record plus an `onnx` section with the validation results).
    Atomic: a failed export or validation leaves nothing at `out`.
    """
    require("onnxruntime", "onnx")
    from slimlm.export.bnb import dir_bytes

    from slimlm.models import SLIMLM_JSON, atomic_dir, decoder_layers, load_model, read_slimlm_json, resolve

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    if model is None:
        kind, where = resolve(str(spec))
        model, tokenizer = load_model(str(spec), dtype="float32", device="cpu", fused=False)
        report = read_slimlm_json(where) if kind == "dir" else {}
    else:
        report = dict(getattr(model, "slimlm_info", {}) or {})
    if getattr(model.config, "quantization_config", None) is not None:
        raise SlimlmError(f"{spec} is quantized with bitsandbytes: export the unquantized model and use "
                          "--weights int8|int4 instead")
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        raw = tmp / (MODEL_FILE if config.weights in ("fp32", "fp16") else "fp32-" + MODEL_FILE)
        graph = trace(model, raw, config)
        fusions = None
        if graph["attention"] == "fused":
            from slimlm.export.graph import fuse_for_ort

            t_fuse = time.perf_counter()
            with _quiet_exporter():
                fusions = fuse_for_ort(raw)
            graph["seconds"] = round(graph["seconds"] + time.perf_counter() - t_fuse, 2)
        t_quant = time.perf_counter()
        mix = None
        if config.weights == "int8":
            mix = quantize_int8(raw, tmp / MODEL_FILE, config.block_size, config.int4_accuracy_level)
        elif config.weights == "int4":
            mix = quantize_int4(raw, tmp / MODEL_FILE, config.block_size, config.int4_accuracy_level,
                                config.int4_method, config.int4_keep8)
        timings = {"trace_s": graph["seconds"], "quantize_s": round(time.perf_counter() - t_quant, 2)}
        if raw.name != MODEL_FILE:
            raw.unlink()
            for extra in tmp.glob(raw.name + ".data"):
                extra.unlink()
        model.config.save_pretrained(tmp)
        cfg_json = json.loads((tmp / "config.json").read_text())
        cfg_json.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        layers = len(decoder_layers(model))
        kv_heads, head_dim = kv_shape(model.config)
        section = {
            "config": asdict(config), "source_model": str(spec) if spec is not None else None,
            "file": MODEL_FILE, "opset": config.opset,
            "kv_layers": graph["kv_layers"], "attention": graph["attention"],
            "max_positions": graph["max_positions"],
            "ffn_layers": [i for i in range(layers) if i not in graph["kv_layers"]],
            "layers": {"attention": graph["n_kv"], "ffn": layers - graph["n_kv"]},
            "kv_heads": kv_heads, "head_dim": head_dim,
            "kv_dtype": "float16" if config.weights == "fp16" else "float32",
            "inputs": input_names(graph["n_kv"]), "outputs": output_names(graph["n_kv"]),
            "disk_bytes": dir_bytes(tmp),
            "quantized_matmuls": mix, "fusions": fusions,
            "library": _versions(),
        }
        report["onnx"] = section
        (tmp / SLIMLM_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
        section["timings"] = timings
        if config.validate:
            t_val = time.perf_counter()
            section["validation"] = validate(tmp, model, tokenizer, config.weights)
            timings["validate_s"] = round(time.perf_counter() - t_val, 2)
            if not section["validation"]["passed"]:
                raise SlimlmError(f"ONNX validation failed ({config.weights}): "
                                  + "; ".join(section["validation"]["failures"]))
        timings["total_s"] = round(time.perf_counter() - t0, 2)
        (tmp / SLIMLM_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def exported_with(path, config: OnnxConfig) -> bool:
    """Whether the export at `path` was made with exactly `config` (its `slimlm.json` records the settings): a
    cached export whose settings differ from today's (a default that changed since) should be made again."""
    try:
        stored = json.loads((Path(path) / "slimlm.json").read_text())["onnx"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return stored == json.loads(json.dumps(asdict(config)))


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": require("onnxscript", "onnx").__version__}

