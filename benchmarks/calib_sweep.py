"""What moves the quality of a data-free (`--calib self`) compression: SmolLM2-135M, 7 of 30 layers.

Every row runs the default recipe (streamline + ffn, MSE then distillation) with one setting changed, on
self-written calibration windows (sampled once per sampling setting and shared by the rows that use it),
and reports WikiText-2 perplexity on the first 24 windows of 1024 tokens of the first half of FILE, beside
the held-out self-written windows' perplexity ratio that `slimlm compress` prints. The `text` row
calibrates on the second half of FILE instead: the reference the self-calibrated rows try to reach.

    python benchmarks/calib_sweep.py ../shared/data/wikitext-2-raw/wiki.test.raw [--rows default,text]

Row names that hold spaces are quoted: `--rows "seq_len=256 calib_samples=128"`. Prints a table and a final
JSON line. About 5 minutes per row on 2 CPU cores, plus about 4 per sampling.
"""

import argparse
import json
import sys
import time

import torch

# row -> (self-sampling settings, or None for the text row; CompressConfig changes)
ROWS = {
    "default": ({}, {}),
    "kd_epochs=6": ({}, {"kd_epochs": 6}),
    "kd_topk=256": ({}, {"kd_topk": 256}),
    "kd_lr=1e-3": ({}, {"kd_lr": 1e-3}),
    "calib_samples=128": ({}, {"calib_samples": 128}),
    "seq_len=256 calib_samples=128": ({}, {"seq_len": 256, "calib_samples": 128}),
    "plain_frac=0.75": ({"plain_frac": 0.75}, {}),
    "temperature=1.0": ({"temperature": 1.0}, {}),
    "text": (None, {}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ppl", help="text file; evaluation windows from its first half, the text row's from the second")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    from slimlm.compress import CompressConfig, compress
    from slimlm.compress.bench import write_summary
    from slimlm.data import self_generate, token_windows
    from slimlm.evaluate import perplexity
    from slimlm.models import load_model

    text = open(args.ppl, encoding="utf-8").read()
    half = len(text) // 2
    model, tok = load_model(args.model)
    evaluation = token_windows(tok, text[:half], 24, 1024, what="evaluation text")
    dense = perplexity(model, evaluation, progress=False)["ppl"]
    print(f"dense perplexity {dense:.2f}", flush=True)
    cache: dict[str, tuple[torch.Tensor, float]] = {}
    results = []
    for row in rows:
        sampling, changes = ROWS[row]
        cfg = CompressConfig(layers=args.layers, progress=False, **changes)
        n = cfg.calib_samples + cfg.heldout
        key = json.dumps([sampling, n], sort_keys=True)
        model, tok = load_model(args.model)
        if key not in cache:
            t = time.perf_counter()
            if sampling is None:
                windows = token_windows(tok, text[half:], n, cfg.seq_len, what="calibration text")
            else:
                windows = self_generate(model, tok, n, cfg.seq_len, cfg.seed, progress=True, **sampling)
            cache[key] = windows, time.perf_counter() - t
        windows, sample_s = cache[key]
        t = time.perf_counter()
        report = compress(model, cfg, tokenizer=tok, windows=windows).report
        compress_s = time.perf_counter() - t
        ppl = perplexity(model, evaluation, progress=False)["ppl"]
        q = report["quality"]
        results.append({"row": row, "ppl": ppl, "vs_dense": ppl / dense,
                        "heldout_ratio": q["ppl_compressed"] / q["ppl_dense"],
                        "removed_layers": report["selection"]["removed_layers"],
                        "sampling_s": sample_s, "compress_s": compress_s})
        print(f"[{row}] " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                         for k, v in results[-1].items()}), flush=True)
        del model

    print(f"\n| row | WikiText ppl | vs dense ({dense:.2f}) | held-out self ratio | sampling s | compress s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {r['ppl']:.2f} | {r['vs_dense']:.2f}x | {r['heldout_ratio']:.2f}x "
              f"| {r['sampling_s']:.0f} | {r['compress_s']:.0f} |")
    write_summary({"bench": "calib_sweep", "model": args.model, "layers_removed": args.layers, "dense_ppl": dense,
                   "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
