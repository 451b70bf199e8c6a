"""Perplexity of several models on several texts, each against the first model (the reference, usually dense).

One number on one text says little about what a compression kept: a recipe can fit the kind of text it was
tuned on and lose the rest. Each TEXT is cut into the same windows for every model (BOS first where the
tokenizer begins texts with it), and the table gives every model's perplexity and its ratio to the reference's,
per text and by window position (where in a window the loss grows: short context or long).

    python benchmarks/ppl_domains.py --models DENSE,OUT1,OUT2 --texts wiki=FILE,license=FILE,code=FILE \
        [--windows 4] [--seq-len 1024] [--json out.json]

Every model must share the reference's tokenizer (the ratio compares the same tokens). Prints a table and writes
the numbers as JSON with --json.
"""

import argparse
import json
import sys

import torch

from slimlm.data import read_text, token_windows
from slimlm.evaluate import next_token_logprobs
from slimlm.models import load_model

BUCKETS = ((0, 64), (64, 256), (256, 512), (512, None))


def nll_by_position(model, windows: torch.Tensor) -> torch.Tensor:
    """(n, L - 1) negative log-likelihood of every predicted token."""
    with torch.no_grad():
        return torch.cat([-next_token_logprobs(model, windows[i:i + 1]).float() for i in range(len(windows))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated; the first is the reference")
    ap.add_argument("--texts", required=True, help="comma-separated NAME=FILE")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    texts = dict(t.split("=", 1) for t in args.texts.split(",") if t)
    nll: dict[str, dict[str, torch.Tensor]] = {}
    ids: dict[str, torch.Tensor] = {}
    for spec in models:
        model, tok = load_model(spec)
        nll[spec] = {}
        for name, path in texts.items():
            w = token_windows(tok, read_text(path), args.windows, args.seq_len, what=name)
            if name in ids and not torch.equal(ids[name], w):
                print(f"error: {spec} tokenizes {name} differently from {models[0]}; ratios need one tokenizer",
                      file=sys.stderr)
                return 2
            ids[name] = w
            nll[spec][name] = nll_by_position(model, w)
        del model
    ref = models[0]
    out = {"reference": ref, "windows": args.windows, "seq_len": args.seq_len, "texts": texts, "rows": []}
    buckets = [(a, min(b or args.seq_len, args.seq_len)) for a, b in BUCKETS if a < args.seq_len]
    head = f"{'model':40s} {'text':10s} {'ppl':>8s} {'ratio':>7s} " + " ".join(f"{f'{a}-{b}':>9s}" for a, b in buckets)
    print(head)
    for spec in models:
        for name in texts:
            x, r = nll[spec][name], nll[ref][name]
            by_pos = {f"{a}-{b}": float((x[:, a:b].mean() - r[:, a:b].mean()).exp()) for a, b in buckets}
            row = {"model": spec, "text": name, "ppl": float(x.mean().exp()),
                   "ratio": float((x.mean() - r.mean()).exp()), "ratio_by_position": by_pos}
            out["rows"].append(row)
            print(f"{spec[-40:]:40s} {name:10s} {row['ppl']:8.2f} {row['ratio']:6.3f}x "
                  + " ".join(f"{v:8.3f}x" for v in by_pos.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
