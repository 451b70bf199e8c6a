"""benchmarks/decode_bound.py counts the bytes a decode step reads: tables indexed by token or position count as
one row, every other weight in full."""

import pytest


def test_embedding_and_rotary_tables_count_one_row(compressed_dir, tmp_path, bench_script):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from slimlm.export.onnx import OnnxConfig, export_onnx

    out = tmp_path / "int4"
    export_onnx(str(compressed_dir), out, OnnxConfig(weights="int4"))
    graph = onnx.load(str(out / "model.onnx")).graph
    nbytes = {i.name: numpy_helper.to_array(i).nbytes for i in graph.initializer}
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    # With int4 weights the head is a MatMulNBits, and the (tied) embedding is gathered from the head's own
    # quantized blocks: no table is read by row only, the head is read in full.
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert not [i for i in graph.initializer if users.get(i.name) in ({"Gather"}, {"GatherBlockQuantized"})
                and len(i.dims) == 2]
    # the cos/sin tables: read by RotaryEmbedding nodes or, where the rotary went into the attention node, as
    # GroupQueryAttention's inputs 7 and 8
    tables = {name for node in graph.node if node.op_type == "GroupQueryAttention" for name in node.input[7:9]}
    rot = sum(nbytes[i.name] for i in graph.initializer
              if users.get(i.name) == {"RotaryEmbedding"}
              or (i.name in tables and users[i.name] == {"GroupQueryAttention"}))
    assert rot  # the fused export has rotary tables
    ceiling = sum(nbytes.values())
    got = bench_script("decode_bound").weight_bytes_per_token(out / "model.onnx")["bytes_per_token"]
    assert ceiling - rot <= got <= ceiling
    if rot:
        assert got < ceiling  # the rotary caches count as rows, not in full
