"""Graph passes after tracing: onnxscript's fusions for onnxruntime, and packing of weight-only MatMuls.

Both cut the number of nodes a decode step dispatches; neither changes what the graph computes:
- `fuse_for_ort`: onnxscript's `optimize_for_ort` (RMSNorm -> SimplifiedLayerNormalization, residual add + RMSNorm
  -> SkipSimplifiedLayerNormalization, and its other onnxruntime fusions where their patterns match).
- `pack_matmul_nbits`: MatMulNBits nodes that read the same activation with the same settings (q/k/v of one
  layer, gate/up of one MLP) become one MatMulNBits over the weights concatenated along N, and a Split. The
  packed node computes the same dot products bit for bit: blocks run along K, so rows of N are independent.
"""

from __future__ import annotations

import collections
from pathlib import Path


def fuse_for_ort(path: Path) -> dict[str, int]:
    """Rewrite the ONNX file at `path` in place with onnxscript's onnxruntime fusions; returns their counts."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from slimlm.export.onnx_trace import save_onnx

    model, counts = optimize_for_ort(ir.load(str(path)))
    save_onnx(ir.to_proto(model), path)
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
    if not made:
        return 0
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replace.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return made
