"""The same ONNX export decoded by slimlm's runtime (`OnnxCausalLM`) and by onnxruntime-genai (`og.Generator`).

    python benchmarks/genai_decode.py ONNX_DIR --genai-python PY [--tokens 128] [--prompt 32] [--rounds 5]
        [--threads 2] [--json OUT]

ONNX_DIR: a `slimlm export onnx` output (it carries genai_config.json). PY: a Python with onnxruntime-genai (it
pins its own onnxruntime, so usually a venv of its own). Batch-1 greedy decode of --tokens tokens after a prompt of
--prompt tokens, no early stop, each row in a fresh process, the two rows alternating for --rounds rounds; decode
tok/s is tokens after the first over the time after the first, medians reported. Both rows must produce the same
tokens (checked). Both run at --threads (onnxruntime-genai through a config overlay of its session options).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
kind, path, prompt, n, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out, marks = [], []
if kind == "genai":
    import onnxruntime_genai as og
    config = og.Config(path)
    # the same threads as slimlm's row (genai_config.json sets none: onnxruntime's default is the physical cores,
    # one on a 2-vCPU VM with SMT)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        marks.append(time.perf_counter())
else:
    import numpy as np
    from slimlm.export import OnnxCausalLM
    lm = OnnxCausalLM(path, threads=threads)
    t0 = time.perf_counter()
    k = len(prompt)
    logits, past = lm.step(np.array([prompt]), np.ones((1, k), np.int64), np.arange(k)[None], None)
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        marks.append(time.perf_counter())
        k += 1
        logits, past = lm.step(np.array([[tok]]), np.ones((1, k), np.int64), np.array([[k - 1]]), past)
first = marks[0] - t0
rate = (len(marks) - 1) / (marks[-1] - marks[0])
print(json.dumps({"tokens": out, "first_token_s": first, "decode_tok_s": rate}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir")
    p.add_argument("--genai-python", required=True)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from slimlm.env import cpu_name

    prompt = [(17 * i + 100) % 20000 + 100 for i in range(args.prompt)]
    runs: dict[str, list[dict]] = {"slimlm": [], "genai": []}
    # PYTHONSAFEPATH: the working directory off sys.path (in a checkout, kernels/ hides a package transformers imports)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": str(args.threads)}
    for r in range(args.rounds):
        for kind in runs:
            py = args.genai_python if kind == "genai" else sys.executable
            res = subprocess.run([py, "-c", WORKER, kind, args.onnx_dir, json.dumps(prompt), str(args.tokens),
                                  str(args.threads)], capture_output=True, text=True,
                                 env=env)
            if res.returncode != 0:
                print(f"{kind}: {res.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {kind}: {runs[kind][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["slimlm"], runs["genai"]))
    med = {k: {"decode_tok_s": statistics.median(x["decode_tok_s"] for x in v),
               "first_token_ms": 1000 * statistics.median(x["first_token_s"] for x in v)} for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:7s} decode {v['decode_tok_s']:7.1f} tok/s   first token {v['first_token_ms']:6.1f} ms")
    ratio = med["slimlm"]["decode_tok_s"] / med["genai"]["decode_tok_s"]
    print(f"slimlm / genai decode: {ratio:.3f}; same tokens: {same}")
    out = {"bench": "genai_decode", "onnx_dir": args.onnx_dir, "cpu": cpu_name(), "threads": args.threads,
           "medians": med, "slimlm_over_genai": ratio, "same_tokens": same,
           "rounds": {k: [x["decode_tok_s"] for x in v] for k, v in runs.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
