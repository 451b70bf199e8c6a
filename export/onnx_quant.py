"""Weight-only quantization of a traced graph with onnxruntime's tools: int8 and the int4 mix.

Through onnxruntime's `MatMulNBitsQuantizer`: block-wise 8-bit (round-to-nearest, asymmetric) MatMulNBits for every
weight MatMul, the output head included; or 4-bit (k-quant-fitted scales, integer zero points) with the most
sensitive matrices (by default the output head, the MLP down projections and the query/key/value projections) kept
at 8 bits. The embedding is read through GatherBlockQuantized: from the head's own 8-bit blocks where the two are
tied, else quantized to 8 bits by itself (`slimlm.export.graph.quantize_embedding`). Why not `quantize_dynamic`
for int8 and why this int4 mix: see `quantize_int8` and `quantize_int4`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from slimlm.errors import SlimlmError, require

INT4_METHODS = ("kquant", "rtn", "hqq")
INT4_KEEP8 = ("head", "down_proj", "q_proj", "k_proj", "v_proj")
# the decoder layers int4_keep8 applies to: every one, or llama.cpp's "more bits" layers (`more_bits`)
KEEP8_LAYERS = ("all", "mixed")


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers Q4_K_M gives more bits (onnxruntime-genai's k_quant_mixed follows it): the
    first and the last eighth, and every third layer in between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= n_layers - eighth or (layer - eighth) % 3 == 2


def names_match(param: str, name: str) -> bool:
    """Whether an `int4_keep8` name selects the parameter `param` ("layers_3_mlp_down_proj", "head"): the whole name
    or its end after an underscore."""
    return param == name or param.endswith("_" + name)


def check_int4_blocks(model, block_size: int) -> None:
    """Refuse, before any work, a block size that gives a weight matrix of `model` (a torch module) an odd number
    of blocks per row: onnxruntime's k-quant/RTN path packs 4-bit zero points two to a byte across rows and cannot
    shape them then (SmolLM2's 576 inputs in blocks of 64: 9 a row)."""
    import math

    import torch

    for name, mod in model.named_modules():
        # a matrix with fewer inputs than a block stays in float (`weight_nodes`)
        if (isinstance(mod, torch.nn.Linear) and mod.in_features >= block_size
                and math.ceil(mod.in_features / block_size) % 2):
            k = mod.in_features
            fits = [b for b in (16, 32, 64, 128, 256) if math.ceil(k / b) % 2 == 0]
            raise SlimlmError(f"--block-size {block_size}: {name} has {k} inputs, {math.ceil(k / block_size)} blocks a "
                              "row, and onnxruntime's 4-bit quantizer needs an even count"
                              + (f"; use {' or '.join(map(str, fits))}" if fits else ""))


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


def quantize_int8(src: Path, dst: Path, block_size: int, accuracy_level: int, head_block: int | None = None) -> dict:
    """int8 weights, block-wise (MatMulNBits with 8 bits), activations left to the kernel (accuracy_level).

    Not `quantize_dynamic`: it quantizes each MatMul's activations per tensor, and SmolLM2-style models carry a few
    hidden dimensions with values in the thousands (the "massive activations" of the first token), which
    crush every other value to zero: measured on SmolLM2-135M, logit cosine fell to 0.3-0.9 past the first token
    (per-tensor int8 activations simulated in PyTorch: the same), while block-wise weight-only int8 keeps > 0.99.
    """
    return _quantize_nbits(src, dst, 8, block_size, accuracy_level, head_block=head_block)


def quantize_int4(src: Path, dst: Path, block_size: int, accuracy_level: int, method: str = "kquant",
                  keep8: tuple[str, ...] = INT4_KEEP8, keep8_layers: str = "all") -> dict:
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
    return _quantize_nbits(src, dst, 4, block_size, accuracy_level, method=method, keep8=keep8,
                           keep8_layers=keep8_layers)


def _param_name(node) -> str:
    """The PyTorch parameter a traced MatMul multiplies by ("layers_3_mlp_down_proj", "head"), from the node
    metadata the torch.export-based exporter writes; "" when absent."""
    import re

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.fx_node":
            found = re.search(r"%p_(\w+?)_weight\b", prop.value)
            return found.group(1) if found else ""
    return ""


def _layer_index(param: str) -> int | None:
    """The decoder layer of a parameter name ("layers_3_mlp_down_proj" -> 3), None outside the layers."""
    import re

    found = re.search(r"(?:^|_)layers_(\d+)_", param)
    return int(found.group(1)) if found else None


def _quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, method: str = "kquant",
                    keep8: tuple[str, ...] = (), keep8_layers: str = "all", head_block: int | None = None) -> dict:
    """Weight-only MatMulNBits: 8 bits through onnxruntime's default quantizer; 4 bits by `method`, the MatMuls whose
    parameter name ends with one of `keep8` at 8 bits (not for hqq). Returns the count of MatMuls per width."""
    require("onnxruntime", "onnx")
    import io

    import numpy as np
    import onnx

    from slimlm.export.graph import fold_into_attention, pack_matmul_nbits, quantize_embedding
    from slimlm.export.onnx_trace import save_onnx

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
    tied = _tied_head(model, keep)
    # nodes_to_include would widen op_types_to_quantize, not narrow it: exclude every other MatMul instead
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep]
    params = {n.name: _param_name(n) for n in model.graph.node if n.name in keep}
    wide = [] if bits != 4 or method == "hqq" else [
        name for name, param in params.items() if any(names_match(param, k) for k in keep8)]
    if keep8_layers == "mixed":  # the head always; a layer's matrices where llama.cpp's rule gives more bits
        layer_of = {name: _layer_index(param) for name, param in params.items()}
        n_layers = max((i for i in layer_of.values() if i is not None), default=-1) + 1
        wide = [name for name in wide if layer_of[name] is None or more_bits(layer_of[name], n_layers)]
    unmatched = [k for k in keep8 if not any(names_match(p, k) for p in params.values())]
    if bits == 4 and method != "hqq" and unmatched and tuple(keep8) != INT4_KEEP8:
        raise SlimlmError(f"--int4-keep8 names no weight matrix of this model: {', '.join(unmatched)} (names match the "
                          "end of a parameter name, e.g. down_proj, q_proj, or 'head')")
    common = dict(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    heads: list[str] = []
    if method == "hqq" and bits == 4:
        quantizer = q.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude,
                                           algo_config=q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    elif bits == 4:
        algo = q.KQuantWeightOnlyQuantConfig if method == "kquant" else q.RTNWeightOnlyQuantConfig
        quantizer = q.MatMulNBitsQuantizer(
            model, **common, algo_config=algo(customized_weight_config={n: {"bits": 8} for n in wide}))
    else:
        heads = [name for name, param in params.items() if names_match(param, "head")] if head_block else []
        if heads and head_block != block_size:  # the head first, at its own block; then the rest
            head_only = dict(common, block_size=head_block, nodes_to_exclude=exclude + [n for n in keep
                                                                                      if n not in heads])
            first = q.MatMulNBitsQuantizer(model, bits=bits, op_types_to_quantize=("MatMul",), **head_only)
            with np.errstate(divide="ignore", invalid="ignore"):
                first.process()
            model = first.model.model
            common["nodes_to_exclude"] = exclude + heads
        quantizer = q.MatMulNBitsQuantizer(model, bits=bits, op_types_to_quantize=("MatMul",), **common)
    # the k-quant/RTN path prints its own progress bar, and divides by zero on constant blocks (a candidate
    # scale it then discards)
    with contextlib.redirect_stdout(io.StringIO()), np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    packed = pack_matmul_nbits(quantizer.model.model)
    qkv = fold_into_attention(quantizer.model.model)["packed"]  # q/k/v as one input of the attention node
    embedding = quantize_embedding(quantizer.model.model, tied, block_size)
    save_onnx(quantizer.model.model, dst)
    n8 = len(wide) if bits == 4 else len(keep)
    out = {"int8_nodes": n8, "int4_nodes": len(keep) - n8, "packed_nodes": packed, "packed_attention": qkv,
           "embedding": embedding}
    if bits == 8:  # the head's block as done (where no MatMul is the head's, all took block_size)
        out["head_block_size"] = head_block if heads and head_block else block_size
    return out


def _tied_head(model, matmuls: list[str]) -> str | None:
    """The output name of the weight MatMul (among `matmuls`) whose matrix is the transpose of the embedding that a
    Gather reads (the tied head), or None."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    tables = [inits[n.input[0]] for n in model.graph.node
              if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if len(tables) != 1:
        return None
    vocab, hidden = tables[0].dims
    table = None
    for node in model.graph.node:
        if node.name in matmuls and list(inits[node.input[1]].dims) == [hidden, vocab]:
            table = numpy_helper.to_array(tables[0]) if table is None else table
            if np.array_equal(numpy_helper.to_array(inits[node.input[1]]).T, table):
                return node.output[0]
    return None
