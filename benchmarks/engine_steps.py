"""Where a serving run's time goes in the engine itself, without HTTP: closed-loop clients submit chat requests
straight to `slimlm.serve.engine.Engine` over the ONNX backend, and timers around the backend's calls add up
prefill, decode steps, batch-cache row moves and the rest (sampling, detokenizing, scheduling).

    python benchmarks/engine_steps.py ONNX_DIR [--clients 8] [--requests 32] [--max-tokens 64]
        [--prefix-cache-mb 256] [--threads 2] [--json OUT]

ONNX_DIR: a `slimlm export onnx` output (`slimlm serve` keeps its own under ~/.cache/slimlm/serve-onnx/). The
requests are 12 questions, numbered (each request a text of its own), through the model's chat template. Run it
on an idle machine. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time

QUESTIONS = ["the sun", "a river", "music", "a prime number", "rain", "gravity", "a violin", "bread", "snow",
             "a planet", "the moon", "a tree"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefix-cache-mb", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from slimlm.env import cpu_name, library_versions
    from slimlm.export import OnnxCausalLM
    from slimlm.serve.engine import Engine, GenRequest
    from slimlm.serve.onnx_backend import OnnxBackend
    from slimlm.serve.sampling import SamplingParams

    lm = OnnxCausalLM(args.onnx_dir, threads=args.threads, stop_spinning=True)
    torch.set_num_threads(1)
    backend = OnnxBackend(lm, None, args.onnx_dir, prefix_cache_mb=args.prefix_cache_mb)
    spent, calls = collections.Counter(), collections.Counter()

    def timed(name):
        fn = getattr(backend, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1
        setattr(backend, name, wrapper)

    for name in ("prefill", "decode", "_reslot"):
        timed(name)
    tok = lm.tokenizer
    # every request its own text (numbered, as `slimlm bench serve` does): what the chat template puts first is
    # all a prefix cache can share
    prompts = [tok.apply_chat_template(
        [{"role": "user", "content": f"{k + 1}. What is {QUESTIONS[k % len(QUESTIONS)]}? Answer in two sentences."}],
        tokenize=False, add_generation_prompt=True) for k in range(args.requests)]
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in prompts]
    engine = Engine(backend, tok, max_batch=max(32, args.clients))
    engine.start()
    lock, issued, ttft = threading.Lock(), [0], []

    def client():
        while True:
            with lock:
                if issued[0] >= args.requests:
                    return
                k = issued[0]
                issued[0] += 1
            done, first, t0 = threading.Event(), [], time.perf_counter()

            def sink(event, done=done, first=first, t0=t0):
                if event["type"] == "delta" and not first:
                    first.append(time.perf_counter() - t0)
                if event["type"] in ("done", "error"):
                    done.set()
            engine.submit(GenRequest(prompt_ids=list(prompts[k]),
                                     params=SamplingParams(temperature=0.0), max_tokens=args.max_tokens, sink=sink))
            done.wait()
            ttft.append(first[0] if first else float("nan"))

    t0 = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(args.clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    engine.stop()
    decode_net = spent["decode"] - spent["_reslot"]  # row moves happen inside decode calls
    parts = {"prefill": spent["prefill"], "decode steps": decode_net, "row moves": spent["_reslot"],
             "engine, sampling, rest": wall - spent["prefill"] - spent["decode"]}
    print(f"{args.clients} clients, {args.requests} requests of {args.max_tokens} tokens, "
          f"{engine.steps} decode steps, {wall:.2f} s; {cpu_name()}")
    for name, s in parts.items():
        n = {"prefill": calls["prefill"], "decode steps": calls["decode"], "row moves": calls["_reslot"]}.get(name)
        each = f"  {1000 * s / n:7.2f} ms each ({n})" if n else ""
        print(f"  {name:24s} {s:7.3f} s {100 * s / wall:5.1f}%{each}")
    print(f"  time to first token p50 {1000 * statistics.median(ttft):.1f} ms")
    stats = backend.info().get("prefix_cache")
    if stats:
        print(f"  prefix cache: {stats['hits']} of {stats['lookups']} prompts, {stats['reused_tokens']} tokens reused")
    out = {"bench": "engine_steps", "onnx_dir": args.onnx_dir, "clients": args.clients, "requests": args.requests,
           "max_tokens": args.max_tokens, "prefix_cache_mb": args.prefix_cache_mb, "wall_s": round(wall, 3),
           "steps": engine.steps, "seconds": {k: round(v, 4) for k, v in parts.items()},
           "calls": dict(calls), "ttft_p50_ms": round(1000 * statistics.median(ttft), 2), "prefix_cache": stats,
           "prefix_cache_state": backend.prefix_reason, "cpu": cpu_name(),
           "versions": library_versions("onnxruntime", "torch")}
    line = json.dumps(out)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
