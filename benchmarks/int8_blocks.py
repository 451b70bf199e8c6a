"""int8 ONNX exports at several quantization block sizes: decode time per token, perplexity, disk.

    python benchmarks/int8_blocks.py MODEL [--blocks 32,64,64/32,128] [--rounds 4] [--threads 2] \
        [--ppl ../shared/data/wikitext-2-raw/wiki.test.raw --windows 8] [--json OUT]

A block "64/32" is 64 for the layers and 32 for the output head (and a tied embedding); a plain "64" is 64 for
the head too. Each is exported once (into --work, reused on later runs), then timed in alternating rounds (one
process, every export loaded; a round decodes 128 greedy tokens after a 24-token prompt with each export in turn,
through the in-place cache the server uses), so that the machine's drift falls on all of them alike. Reports the
median step per export over rounds, its ratio to the first block size, the WikiText-2 perplexity of each export
and of the PyTorch model, and the disk size. This is what `export.onnx.DEFAULT_BLOCK` was chosen from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _decode_ms(lm, prompt: list[int], n: int) -> float:
    """Median ms of one greedy decode step (batch 1) over n steps, through `InPlaceCache`."""
    import numpy as np

    from slimlm.export.runtime import InPlaceCache

    logits, past = lm.step(np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None],
                           None, last=1)
    cache = InPlaceCache(lm, past, len(prompt) + n + 1)
    token, length, times = int(logits[0, -1].argmax()), len(prompt), []
    for _ in range(n):
        mask = np.zeros((1, cache.capacity), np.int64)
        mask[0, :length + 1] = 1
        t0 = time.perf_counter()
        out = cache.run(np.array([[token]]), mask, np.array([[length]]))
        times.append(time.perf_counter() - t0)
        token, length = int(out[0, -1].argmax()), length + 1
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--blocks", default="32,64,64/32,128")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl", default="")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", default=str(Path.home() / ".cache/slimlm/bench-int8-blocks"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from slimlm.env import machine
    from slimlm.export import OnnxConfig, export_onnx, exported_with
    from slimlm.export.bench import _Ort, _perplexity, _Torch
    from slimlm.export.runtime import OnnxCausalLM

    blocks = [b.strip() for b in args.blocks.split(",")]
    dirs = {}
    for b in blocks:
        layers, _, head = b.partition("/")
        out = Path(args.work) / f"{Path(args.model).name}-int8-b{b.replace('/', 'h')}"
        config = OnnxConfig(weights="int8", block_size=int(layers), head_block_size=int(head or layers),
                            validate=False)
        if not exported_with(out, config):
            print(f"exporting block {b} -> {out}", flush=True)
            export_onnx(args.model, out, config, overwrite=True)
        dirs[b] = out
    lms = {b: OnnxCausalLM(str(d), threads=args.threads) for b, d in dirs.items()}
    prompt = lms[blocks[0]].tokenizer("The history of the region is long and varied, shaped by trade, war and "
                                      "migration across the centuries that")["input_ids"][:24]
    rounds = {b: [] for b in blocks}
    for r in range(args.rounds):
        for b in blocks:
            rounds[b].append(round(_decode_ms(lms[b], prompt, 128), 3))
        print(f"round {r + 1}: " + ", ".join(f"b{b} {rounds[b][-1]:.2f} ms" for b in blocks), flush=True)
    rows = []
    for b in blocks:
        row = {"block_size": b, "decode_ms": statistics.median(rounds[b]), "decode_ms_rounds": rounds[b],
               "disk_mb": round(sum(f.stat().st_size for f in dirs[b].iterdir() if f.suffix in (".onnx", ".data"))
                                / 1e6, 1)}
        row["speed_vs_first"] = round(statistics.median(rounds[blocks[0]]) / row["decode_ms"], 3)
        if args.ppl:
            row["ppl"] = round(_perplexity(_Ort(str(dirs[b]), args.threads), args.ppl, args.windows, 1024), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "int8_blocks", "model": args.model, "rows": rows, "machine": machine(),
              "settings": vars(args)}
    if args.ppl:
        result["torch_ppl"] = round(_perplexity(_Torch(args.model, args.threads), args.ppl, args.windows, 1024), 4)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
