"""`slimlm bench compress`: quality and cost of every compression method side by side on one model.

Rows: dense, removal, shortgpt, streamline+ffn, streamline+layer, streamline+linear (default `self`
calibration and the default training, MSE then distillation), plus streamline+ffn trained with MSE
only, calibrated on a text file that is not evaluated (the second half of --ppl), and with
--train-loss lm; width (LLM-Pruner width pruning alone, --width-ratio of the parameters) and depth+width
(streamline+ffn of fewer layers, then width pruning: --depth-width LAYERS:RATIO), whose defaults land near the
parameter count of 7 of SmolLM2-135M's 30 layers removed (the params column says how near); a row name ending in
-norec runs that row without whole-model recovery (on by default in every other row). Columns: perplexity on the
first --windows windows of --seq-len tokens of the first half of --ppl, accuracy on each --mc set (first --limit
examples), stability against dense, parameters, and compress wall time. Calibration windows are computed once per source
and shared; each row's wall time includes that calibration time.

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import time

import torch

from slimlm.cli import OneLineParser, positive_int
from slimlm.errors import SlimlmError

ROWS = {
    "removal": {"method": "removal", "replacement": "none"},
    "shortgpt": {"method": "shortgpt", "replacement": "none"},
    "streamline+ffn": {"method": "streamline", "replacement": "ffn"},
    "streamline+layer": {"method": "streamline", "replacement": "layer"},
    "streamline+linear": {"method": "streamline", "replacement": "linear"},
}


def main(argv=None) -> int:
    p = OneLineParser(prog="slimlm bench compress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--ppl", required=True, help="text file; windows come from its first half")
    p.add_argument("--windows", type=positive_int, default=24)
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--mc", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--limit", type=positive_int, default=500)
    p.add_argument("--width-ratio", type=float, default=0.16, help="the width row's fraction of parameters removed")
    p.add_argument("--depth-width", default="4:0.08", metavar="LAYERS:RATIO",
                   help="the depth+width row: layers removed (streamline+ffn), then this fraction by width")
    p.add_argument("--rows", default=",".join(["dense", *ROWS, "streamline+ffn-norec", "streamline+ffn(mse)",
                                                "streamline+ffn(text)", "streamline+ffn(lm)", "width",
                                                "depth+width"]),
                   help="rows to run; any compressed row + '-norec' runs without whole-model recovery")
    p.add_argument("--calib-samples", type=positive_int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from slimlm.compress import CompressConfig, compress
    from slimlm.data import calibration_windows, read_utf8, token_windows
    from slimlm.evaluate import EvalConfig, load_mc, mc_pairs, multiple_choice, perplexity, stability
    from slimlm.models import check_report, decoder_layers, load_model

    # every input is checked before the model loads: a run takes hours
    mc = mc_pairs(args.mc)
    EvalConfig(ppl=args.ppl, seq_len=args.seq_len, mc=mc)  # the checks of `slimlm eval` (files, names)
    text = read_utf8(args.ppl, "perplexity file")
    sets = {name: load_mc(path, args.limit) for name, path in mc}
    given = {"calib_samples": args.calib_samples, "epochs": args.epochs}
    base = CompressConfig(layers=args.layers, progress=False, **{k: v for k, v in given.items() if v is not None})
    rows = [r for r in args.rows.split(",") if r]
    widths = _widths(args.width_ratio, args.depth_width)
    for row in rows:
        if row != "dense":
            CompressConfig(**{**base.to_dict(), **_row_config(row, widths)})  # a bad ratio: one line, now
    if args.json:
        check_report(args.json)
    half = len(text) // 2
    first, second = text[:half], text[half:]
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    eval_windows = token_windows(tok, first, args.windows, args.seq_len, what="evaluation text")

    def evaluate(m):
        out = {"ppl": perplexity(m, eval_windows, progress=False)["ppl"],
               "params": sum(x.numel() for x in m.parameters())}
        res = {}
        for name, ex in sets.items():
            res[name] = multiple_choice(m, tok, ex, progress=False, name=name)
            out[name] = res[name].acc
        return out, res

    results, dense_res = [], None
    t = time.perf_counter()
    calib_self = calibration_windows(model, tok, "self", base.calib_samples + base.heldout, base.seq_len, base.seed,
                                     progress=True)
    t_self = time.perf_counter() - t
    t = time.perf_counter()
    calib_text = token_windows(tok, second, base.calib_samples + base.heldout, base.seq_len, what="calibration text")
    t_text = time.perf_counter() - t
    for row in rows:
        model, tok = load_model(args.model)
        t0 = time.perf_counter()
        if row == "dense":
            wall = 0.0
        else:
            cfg = CompressConfig(**{**base.to_dict(), **_row_config(row, widths)})
            if "(text)" in row:
                cfg.calib = f"{args.ppl} (second half)"
            windows = calib_text if "(text)" in row else calib_self
            compress(model, cfg, tokenizer=tok, windows=windows)
            wall = time.perf_counter() - t0 + (t_text if "(text)" in row else t_self)
        metrics, res = evaluate(model)
        if row == "dense":
            dense_res = res
        for name in sets:
            metrics[f"{name}_stability"] = stability(res[name], dense_res[name]) if dense_res else None
        metrics.update(row=row, compress_s=wall, layers=len(decoder_layers(model)))
        results.append(metrics)
        print(f"[{row}] " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}),
              flush=True)
        del model
    _print_table(results, list(sets))
    write_summary({"bench": "compress", "model": args.model, "layers_removed": args.layers,
                   "eval": {"ppl_file": args.ppl, "windows": args.windows, "seq_len": args.seq_len,
                            "mc_limit": args.limit}, "results": results}, args.json)
    return 0


def write_summary(summary: dict, path: str | None) -> None:
    """Add the machine and library versions to a benchmark's summary, write it to `path` (when given) and print
    it as the final JSON line."""
    from slimlm.env import library_versions, machine

    summary = {**summary, "machine": machine(), "versions": library_versions("torch", "transformers")}
    if path:
        from slimlm.models import write_file

        write_file(path, json.dumps(summary, indent=2))
    print(json.dumps(summary))


def _widths(width_ratio: float, depth_width: str) -> dict:
    """The width rows' settings from --width-ratio and --depth-width LAYERS:RATIO."""
    try:
        layers, ratio = depth_width.split(":")
        layers, ratio = int(layers), float(ratio)
    except ValueError:
        raise SlimlmError(f"--depth-width takes LAYERS:RATIO (e.g. 4:0.08), got {depth_width!r}") from None
    return {"width": {"method": "width", "width_ratio": width_ratio, "layers": None, "ratio": None,
                      "replacement": None},
            "depth+width": {**ROWS["streamline+ffn"], "layers": layers, "ratio": None, "width_ratio": ratio}}


def _row_config(row: str, widths: dict | None = None) -> dict:
    widths = widths or _widths(0.16, "4:0.08")
    if row.endswith("-norec"):  # the same row without whole-model recovery
        return {**_row_config(row[:-len("-norec")], widths), "recover_minutes": 0.0}
    if row in widths:
        return widths[row]
    if row in ROWS:
        return ROWS[row]
    if row == "streamline+ffn(text)":
        return dict(ROWS["streamline+ffn"])
    if row == "streamline+ffn(mse)":
        return {**ROWS["streamline+ffn"], "train_loss": "mse"}
    if row == "streamline+ffn(lm)":
        return {**ROWS["streamline+ffn"], "train_loss": "lm"}
    raise SlimlmError(f"unknown row {row!r}")


def _print_table(results: list[dict], sets: list[str]) -> None:
    dense = next((r for r in results if r["row"] == "dense"), None)
    head = ["row", "layers", "ppl", "ppl/dense", *[f"{s} acc" for s in sets], *[f"{s} stab" for s in sets],
            "params (M)", "compress s"]
    lines = [head]
    for r in results:
        lines.append([r["row"], str(r["layers"]), f"{r['ppl']:.2f}",
                      f"{r['ppl'] / dense['ppl']:.2f}x" if dense else "-",
                      *[f"{r[s]:.3f}" for s in sets],
                      *[(f"{r[s + '_stability']:.3f}" if r.get(s + "_stability") is not None else "-") for s in sets],
                      f"{r['params'] / 1e6:.1f}", f"{r['compress_s']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
