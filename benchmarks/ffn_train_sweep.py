"""Sweep of FFN-replacement training settings on SmolLM2-135M (block 12-18 of 30, 7 layers).

Caches the block's input/output hidden states once on 32 windows of 512 tokens from the second half
of WikiText-2 test, trains one FFN per setting, and prints validation MSE, training time and
perplexity on 8 windows of 1024 tokens from the first half. It chose the defaults of CompressConfig
(lr, batch_size).

    python benchmarks/ffn_train_sweep.py ../shared/data/wikitext-2-raw/wiki.test.raw
"""

import copy
import json
import sys
import time

import slimlm
from slimlm.compress import CompressConfig
from slimlm.compress.replace import new_ffn_slot, train_mse
from slimlm.compress.select import collect_block_io
from slimlm.data import token_windows
from slimlm.evaluate import perplexity
from slimlm.models import replace_layers

SETTINGS = [(1024, 3e-4, 8), (256, 1e-3, 8), (128, 1e-3, 12)]  # (tokens per step, lr, epochs)
START, N = 12, 7


def main(path: str) -> None:
    text = open(path, encoding="utf-8").read()
    half = len(text) // 2
    model, tok = slimlm.load_model("smollm2-135m")
    evaluation = token_windows(tok, text[:half], 8, 1024)
    calibration = token_windows(tok, text[half:], 32, 512)
    io = collect_block_io(model, calibration, START, START + N, progress=False)
    rows = []
    for batch, lr, epochs in SETTINGS:
        pruned = copy.deepcopy(model)
        module = new_ffn_slot(pruned, START)
        cfg = CompressConfig(layers=N, batch_size=batch, lr=lr, epochs=epochs, progress=False)
        t0 = time.perf_counter()
        fit = train_mse(pruned, module, io["x"], io["y"], cfg, "ffn")
        seconds = time.perf_counter() - t0
        replace_layers(pruned, list(range(START, START + N)), replacement=module)
        row = {"batch": batch, "lr": lr, "epochs": epochs, "val_mse_before": fit["history"][0]["val_mse"],
               "val_mse": fit["best_val_mse"], "train_s": seconds,
               "ppl": perplexity(pruned, evaluation, progress=False)["ppl"]}
        rows.append(row)
        print(f"batch {batch:5d}  lr {lr:g}  epochs {epochs:2d}  val mse {row['val_mse_before']:.4g} -> "
              f"{row['val_mse']:.4g}  train {seconds:.0f} s  ppl {row['ppl']:.2f}", flush=True)
    print(json.dumps({"bench": "ffn_train_sweep", "block": [START, START + N - 1], "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1])
