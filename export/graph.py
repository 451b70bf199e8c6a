"""Graph passes after tracing: onnxscript's fusions for onnxruntime, and packing of weight-only MatMuls.

Both cut the number of nodes a decode step dispatches; neither changes what the graph computes:
- `fuse_for_ort`: onnxscript's `optimize_for_ort` (RMSNorm -> SimplifiedLayerNormalization, residual add + RMSNorm
  -> SkipSimplifiedLayerNormalization, and its other onnxruntime fusions where their patterns match).
- `pack_matmul_nbits`: MatMulNBits nodes that read the same activation with the same settings (q/k/v of one
  layer, gate/up of one MLP) become one MatMulNBits over the weights concatenated along N, and a Split. The
  packed node computes the same dot products bit for bit: blocks run along K, so rows of N are independent.
- `fold_into_attention`: the rotary of q and k (after `fuse_for_ort`) and the Split of a packed q/k/v (after
  `pack_matmul_nbits`) go into the GroupQueryAttention node itself, which takes both as inputs.
"""

from __future__ import annotations

import collections
from pathlib import Path


def fuse_for_ort(path: Path) -> dict[str, int]:
    """Rewrite the ONNX file at `path` in place with onnxscript's onnxruntime fusions and the rotary folded into the
    attention nodes (`fold_into_attention`); returns their counts."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from slimlm.export.onnx_trace import save_onnx

    model, counts = optimize_for_ort(ir.load(str(path)))
    proto = ir.to_proto(model)
    folded = fold_into_attention(proto)
    save_onnx(proto, path)
    counts = {**counts, "rotary_into_attention": folded["rotary"]}
    return {k: int(v) for k, v in counts.items() if v}


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def pack_matmul_nbits(model) -> int:
    """Pack, in place, the MatMulNBits nodes of `model` (an onnx ModelProto) that share their activation input and
    every attribute but N, and whose other inputs are all initializers (no g_idx). Returns how many packed nodes
    were made."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = collections.defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or not node.name:
            continue
        consts = list(node.input[1:])
        if len(consts) > 3 and consts[3]:  # g_idx runs along K: not per output row
            continue
        if not all(name in inits for name in consts if name):
            continue
        attrs = _attrs(node)
        width = attrs.pop("N")
        key = (node.input[0], tuple(bool(n) for n in consts), tuple(sorted(attrs.items())))
        groups[key].append((node, width))
    replace: dict[str, list] = {}
    made = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        nodes, widths = [n for n, _ in members], [w for _, w in members]
        first = nodes[0]
        attrs = _attrs(first)
        inputs = [first.input[0]]
        for j in range(1, len(first.input)):
            if not first.input[j]:
                inputs.append("")
                continue
            packed = np.concatenate([numpy_helper.to_array(inits[n.input[j]]) for n in nodes], axis=0)
            tensor = numpy_helper.from_array(packed, f"{first.input[j]}_packed")
            graph.initializer.append(tensor)
            inputs.append(tensor.name)
        attrs["N"] = int(sum(widths))
        out = f"{first.output[0]}_packed"
        matmul = onnx.helper.make_node("MatMulNBits", inputs, [out], name=f"{first.name}_packed",
                                       domain="com.microsoft", **attrs)
        sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{first.name}_split_sizes")
        graph.initializer.append(sizes)
        split = onnx.helper.make_node("Split", [out, sizes.name], [n.output[0] for n in nodes],
                                      name=f"{first.name}_split", axis=-1)
        # the packed node goes where the first of the group was: its activation input exists there
        replace[first.name] = [matmul, split]
        for n in nodes[1:]:
            replace[n.name] = []
        made += 1
    if made:
        _replace_nodes(graph, replace)
    return made


def _replace_nodes(graph, replace: dict[str, list]) -> None:
    """Put, in place, `replace[name]` (a list of nodes, maybe empty) where the node of that name was, and drop the
    initializers no node reads any more."""
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replace.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_embedding(model, tied_head: str | None, block_size: int) -> dict | None:
    """Replace, in place, the Gather from the fp32 embedding matrix of `model` (an onnx ModelProto after weight-only
    quantization) with onnxruntime's GatherBlockQuantized, so that the embedding is not the largest thing on disk
    (SmolLM2-135M: 113 of 216 MB of the int4 export; Gemma 3 270M: 671 of 962 MB of the int8 one).

    `tied_head`: the output name of the head MatMulNBits when the head is the embedding's transpose (a tied model);
    then the Gather reads the head's own quantized weight, scales and zero points (through Reshapes onnxruntime
    folds at load), so the file holds the matrix once and the embedding gets exactly the head's rounding. Otherwise
    the embedding is quantized on its own: 8 bits per value, asymmetric, `block_size` values per scale along the
    hidden size (what MatMulNBits does for int8; a smaller block where the hidden size is no whole number of them),
    which costs a quarter of fp32. Returns what was done, or None when the graph has no such Gather (an fp32 export,
    or a hidden size that is not a whole number of 16-value blocks).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(inits[n.input[0]].dims) == 2
                   and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT), None)
    if gather is None:
        return None
    gather.name = gather.name or "embedding_gather"  # replaced by name below
    vocab, hidden = (int(d) for d in inits[gather.input[0]].dims)
    head = next((n for n in graph.node if tied_head and n.op_type == "MatMulNBits" and n.output[0] == tied_head),
                None)
    new_inits, nodes = [], []
    if head is not None:
        attrs = _attrs(head)
        bits, block = int(attrs["bits"]), int(attrs["block_size"])
        if ((attrs["N"], attrs["K"]) != (vocab, hidden) or hidden % block or len(head.input) < 4 or not head.input[3]
                or inits.get(head.input[3]) is None or inits[head.input[3]].data_type != onnx.TensorProto.UINT8):
            head = None  # GatherBlockQuantized takes integer zero points only (HQQ's are float)
    if head is not None:
        row = hidden * bits // 8
        shape = numpy_helper.from_array(np.array([vocab, row], dtype=np.int64), f"{gather.name}_q_shape")
        new_inits.append(shape)
        data = f"{gather.name}_q"
        nodes.append(onnx.helper.make_node("Reshape", [head.input[1], shape.name], [data],
                                           name=f"{gather.name}_reshape"))
        scales, zeros = head.input[2], head.input[3]
        for name in (scales, zeros):  # 2-D [N, blocks] from the quantizer; older ones wrote them flat
            if len(inits[name].dims) != 2:
                rows = numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), f"{name}_rows")
                new_inits.append(rows)
                nodes.append(onnx.helper.make_node("Reshape", [name, rows.name], [f"{name}_2d"],
                                                   name=f"{name}_reshape"))
        scales = scales if len(inits[scales].dims) == 2 else f"{scales}_2d"
        zeros = zeros if len(inits[zeros].dims) == 2 else f"{zeros}_2d"
        how = {"bits": bits, "block_size": block, "shared_with_head": True}
    else:
        # the largest block up to block_size that the hidden size is a whole number of (576 = 9 x 64, not x 128)
        block = next((b for b in (block_size >> i for i in range(block_size.bit_length())) if b >= 16
                      and not hidden % b), None)
        if block is None:
            return None
        bits = 8
        weight = numpy_helper.to_array(inits[gather.input[0]]).reshape(vocab, hidden // block, block)
        lo, hi = np.minimum(weight.min(-1), 0), np.maximum(weight.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / 255, 1).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 255)
        q = np.clip(np.round(weight / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
        data, scales, zeros = f"{gather.name}_q", f"{gather.name}_scales", f"{gather.name}_zero_points"
        new_inits += [numpy_helper.from_array(q.reshape(vocab, hidden), data),
                      numpy_helper.from_array(scale, scales), numpy_helper.from_array(zero.astype(np.uint8), zeros)]
        how = {"bits": 8, "block_size": block, "shared_with_head": False}
    nodes.append(onnx.helper.make_node("GatherBlockQuantized", [data, gather.input[1], scales, zeros],
                                       list(gather.output), name=f"{gather.name}_q", domain="com.microsoft",
                                       bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    graph.initializer.extend(new_inits)
    _replace_nodes(graph, {gather.name: nodes})
    return how


def fold_into_attention(model) -> dict[str, int]:
    """Fold, in place, what feeds each GroupQueryAttention node of `model` (an onnx ModelProto) into the node:

    - rotary: q and k each rotated by a RotaryEmbedding over the same positions and cos/sin table (not interleaved)
      -> the attention node rotates them itself (`do_rotary`, the table and `position_ids` as its inputs);
    - packed: q, k and v the three outputs of one Split of a packed projection (`pack_matmul_nbits`) -> the node
      takes the packed (B, T, (H + 2 KV) * D) projection as its query input.

    A decode step of SmolLM2 dispatches 3 fewer nodes per attention layer (the two rotaries and the Split); the
    kernel runs the same rotary code on the same positions. Nothing is folded where another node also reads what
    would go. Returns how many nodes got each fold."""
    import onnx

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    readers: dict[str, int] = collections.Counter(name for n in graph.node for name in n.input)
    readers.update(o.name for o in graph.output)
    drop: set[str] = set()
    counts = {"rotary": 0, "packed": 0}

    def only_for(name) -> bool:  # read by the attention node alone (a fold moves a reader, never adds one)
        return bool(name) and readers[name] == 1

    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or not node.name:
            continue
        attrs = _attrs(node)
        inputs = list(node.input) + [""] * (10 - len(node.input))
        if not attrs.get("do_rotary") and not any(inputs[7:10]):
            rq, rk = producer.get(inputs[0]), producer.get(inputs[1])
            if (rq is not None and rk is not None and rq.op_type == rk.op_type == "RotaryEmbedding"
                    and rq.domain == rk.domain == "com.microsoft" and list(rq.input[1:]) == list(rk.input[1:])
                    and len(rq.input) == 4 and not _attrs(rq).get("interleaved") and not _attrs(rk).get("interleaved")
                    and not _attrs(rq).get("rotary_embedding_dim") and _attrs(rq).get("scale", 1.0) == 1.0
                    and _attrs(rk).get("scale", 1.0) == 1.0 and only_for(rq.output[0])
                    and only_for(rk.output[0]) and rq.name and rk.name):
                position_ids, cos, sin = rq.input[1:]
                inputs[0], inputs[1] = rq.input[0], rk.input[0]
                inputs[7:10] = [cos, sin, position_ids]
                node.attribute.extend([onnx.helper.make_attribute("do_rotary", 1),
                                       onnx.helper.make_attribute("rotary_interleaved", 0)])
                drop |= {rq.name, rk.name}
                counts["rotary"] += 1
        split = producer.get(inputs[0])
        if (split is not None and split.op_type == "Split" and split.name and list(split.output) == inputs[:3]
                and _attrs(split).get("axis", 0) in (-1, 2) and all(only_for(name) for name in inputs[:3])):
            inputs[0:3] = [split.input[0], "", ""]
            drop.add(split.name)
            counts["packed"] += 1
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
    if drop:
        _replace_nodes(graph, {name: [] for name in drop})
    return counts
