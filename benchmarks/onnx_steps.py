"""Where an ONNX serving step's time goes: prefill time against prompt length, and the cost of batch-invariant
(right-padded) decoding against left padding on the same graph.

    python benchmarks/onnx_steps.py ONNX_DIR [--threads 2] [--lengths 1,2,8,23,64,256] [--batch 8] [--steps 64]
        [--rounds 6] [--json OUT]

ONNX_DIR: a `slimlm export onnx` output with fused attention (the server's default export; `slimlm serve` keeps
its own under ~/.cache/slimlm/serve-onnx/). Prefill: `OnnxCausalLM.step` over one prompt of each length from an
empty cache, median of 10 timed runs after 2 warm-ups. Decode: `OnnxBackend` prefills --batch prompts of
different lengths (20 to 40 tokens), then decodes --steps greedy steps of the whole batch, with the rows right-
padded (each row computed exactly as alone: the default) or left-padded (forced on the same graph); the two
layouts alternate for --rounds rounds, medians reported. Run it on an idle machine. Prints a table, then one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="1,2,8,23,64,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from slimlm.env import cpu_name, library_versions
    from slimlm.export import OnnxCausalLM
    from slimlm.serve.onnx_backend import OnnxBackend

    lm = OnnxCausalLM(args.onnx_dir, threads=args.threads)
    if not lm.right_padding:
        print(f"{args.onnx_dir}: not a right-padding (fused attention) export", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    vocab = int(lm.config.vocab_size)
    prefill = {}
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = rng.integers(100, min(vocab, 20000), size=(1, n))
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            lm.step(ids, np.ones((1, n), np.int64), np.arange(n)[None], None)
            times.append(time.perf_counter() - t0)
        prefill[n] = statistics.median(times[2:]) * 1000
        print(f"prefill {n:5d} tokens  {prefill[n]:8.2f} ms  {prefill[n] / n:6.2f} ms/token", flush=True)

    lengths = [20 + (20 * i) // max(1, args.batch - 1) for i in range(args.batch)]
    prompts = [rng.integers(100, min(vocab, 20000), size=n).tolist() for n in lengths]

    def decode(right: bool, steps: int) -> float:
        backend = OnnxBackend(lm)
        backend.right = right
        tokens = [int(backend.prefill(i, ids).argmax()) for i, ids in enumerate(prompts)]
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = backend.decode(list(range(len(prompts))), tokens).argmax(-1).tolist()
        return (time.perf_counter() - t0) / steps * 1000

    decode(True, 4)
    runs: dict[str, list[float]] = {"right": [], "left": []}
    for _ in range(args.rounds):
        for layout in runs:
            runs[layout].append(decode(layout == "right", args.steps))
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"decode batch {args.batch}, {k:5s} padding  {med[k]:7.2f} ms/step  (rounds: "
              f"{', '.join(f'{x:.2f}' for x in v)})")
    print(f"right / left: {med['right'] / med['left']:.3f}")
    out = {"bench": "onnx_steps", "onnx_dir": args.onnx_dir, "cpu": cpu_name(), "threads": args.threads,
           "prefill_ms": prefill, "decode_ms_per_step": med, "decode_rounds": runs,
           "right_over_left": med["right"] / med["left"], "batch": args.batch, "steps": args.steps,
           "versions": library_versions("onnxruntime")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
