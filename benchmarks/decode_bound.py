"""How fast can batch-1 decode go on this machine? Weight bytes read per token over memory read bandwidth.

    python benchmarks/decode_bound.py ONNX_DIR [ONNX_DIR ...] [--threads 2] [--json OUT]

For each exported model (`slimlm export onnx` output, or the artefacts `slimlm bench export` keeps under the
slimlm cache) it sums the bytes of every weight a decode step reads: every initializer in full, except tables
only indexed by token or position (the token embedding, the rotary caches), of which one row per token is read.
Read bandwidth is the best of several float32 sums, with `--threads` threads, over a buffer of the model's own
size read again and again as decode reads its weights (served from cache where the machine's last-level cache
holds it) and, for reference, over 1 GiB (from memory). Bytes per token over the first is a ceiling on decode
tokens per second that no kernel passes (the KV cache and activations, small at short context, are left out,
so the true ceiling is lower). Run it on an idle machine: bandwidth and cache are shared.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# (op, input index) pairs that read one row of a table per token: the embedding lookup (plain or block-quantized,
# with its scales and zero points) and the rotary cos/sin caches indexed by position.
_ROW_READS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3),
              ("RotaryEmbedding", 2), ("RotaryEmbedding", 3), ("GroupQueryAttention", 7), ("GroupQueryAttention", 8)}


def weight_bytes_per_token(model_path: Path) -> dict:
    """Bytes of initializers a decode step reads, from the graph's shapes (external data is not loaded)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, k))
    full = gathered = 0
    for init in graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        size = n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        uses = consumers.get(init.name, [])
        if uses and all(use in _ROW_READS for use in uses) and init.dims:
            gathered += size // max(1, init.dims[0])  # one row per token (or per position)
        else:
            full += size
    return {"bytes_per_token": full + gathered, "weights_mb": full / 1e6, "gathered_row_bytes": gathered}


def read_bandwidth_gbs(threads: int, mb: int = 1024, repeats: int = 7) -> float:
    """Best read bandwidth of a float32 sum over an `mb`-megabyte buffer."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    buf.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="directories holding model.onnx (or model.onnx paths)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    paths = []
    for m in args.models:
        path = Path(m)
        path = path / "model.onnx" if path.is_dir() else path
        if not path.is_file():
            print(f"error: no ONNX model at {path}", file=sys.stderr)
            return 2
        paths.append(path)
    memory_gbs = read_bandwidth_gbs(args.threads)
    print(f"read bandwidth from memory (1 GiB), {args.threads} threads: {memory_gbs:.1f} GB/s")
    rows = []
    for path in paths:
        w = weight_bytes_per_token(path)
        gbs = read_bandwidth_gbs(args.threads, mb=max(1, math.ceil(w["bytes_per_token"] / 2**20)))
        ceiling = gbs * 1e9 / w["bytes_per_token"]
        rows.append({"model": str(path.parent), **w, "read_gbs": gbs, "memory_read_gbs": memory_gbs,
                     "ceiling_tok_s": ceiling})
        print(f"{str(path.parent):<50} {w['bytes_per_token'] / 1e6:7.1f} MB/token, read at {gbs:5.1f} GB/s: "
              f"ceiling {ceiling:6.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(json.dumps({"memory_read_gbs": round(memory_gbs, 2), "rows": [
        {k: r[k] for k in ("model", "bytes_per_token", "read_gbs", "ceiling_tok_s")} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
