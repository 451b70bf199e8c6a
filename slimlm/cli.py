"""The `slimlm` command: a thin shell over the stage functions.

Subcommands: compress, eval, quantize, export, serve, profile, bench. Each stage's flags are its config's
fields. A user error exits 2 with one line on stderr; an unexpected error prints one line too
(SLIMLM_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from slimlm.errors import SlimlmError

# Stages that register their own subcommands: module path -> function `register(subparsers)`.
STAGE_CLIS = ("slimlm.export.cli", "slimlm.serve.cli")
# `slimlm bench NAME` -> module with `main(argv) -> int`.
BENCHES = {
    "compress": "slimlm.compress.bench",
    "kernel": "slimlm.kernels.bench",
    "export": "slimlm.export.bench",
    "serve": "slimlm.serve.bench",
    "pareto": "slimlm.compress.pareto",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other slimlm error (the usage is one --help away)."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)" if self.add_help else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or more")


# the argparse types the bench commands share (the underscored names stay for code in flight)
positive_int, non_negative_int = _positive_int, _non_negative_int


def _d(name: str):
    """CompressConfig's default for a field (the CLI never keeps its own copy; the import is light)."""
    from dataclasses import fields

    from slimlm.compress.config import CompressConfig

    return next(f.default for f in fields(CompressConfig) if f.name == name)


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="remove redundant layers and train a replacement",
                       description="Remove the most redundant layers of MODEL and write the result to OUT.")
    p.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file or 'smollm2-135m'")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (written atomically)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=_positive_int, help="number of layers to remove")
    g.add_argument("--ratio", type=float, help="fraction of layers to remove, in (0, 1)")
    p.add_argument("--width-ratio", type=float, default=None,
                   help="fraction of the parameters to remove as MLP channels (and heads with --width-heads), in "
                        "(0, 1) (width pruning; after the layer removal when combined with --layers/--ratio)")
    p.add_argument("--width-heads", action="store_true",
                   help="width pruning may remove attention heads too (default: MLP channels only)")
    p.add_argument("--width-windows", type=int, default=32,
                   help="calibration windows whose gradients rank the width to remove (default 32)")
    p.add_argument("--method", default="streamline", help="streamline | shortgpt | removal | width")
    p.add_argument("--block-choice", default=_d("block_choice"),
                   help="how streamline/removal pick their block: loss (the removal that costs the calibration text "
                        "least; default) | cosine (LLM-Streamline's most similar input/output)")
    p.add_argument("--replacement", default=None, help="ffn | layer | linear | none (default: ffn for streamline)")
    p.add_argument("--calib", default="self", help="self | PATH(.txt/.jsonl) | hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--calib-samples", type=_positive_int, default=_d("calib_samples"))
    p.add_argument("--seq-len", type=_positive_int, default=_d("seq_len"))
    p.add_argument("--epochs", type=int, default=_d("epochs"), help="MSE epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=_d("lr"), help="MSE peak learning rate (default: %(default)s)")
    p.add_argument("--train-loss", default=_d("train_loss"),
                   help="mse | kd (MSE, then distillation against the original model) | lm (default: %(default)s)")
    p.add_argument("--kd-epochs", type=int, default=_d("kd_epochs"))
    p.add_argument("--kd-lr", type=float, default=_d("kd_lr"))
    p.add_argument("--lm-epochs", type=int, default=_d("lm_epochs"))
    p.add_argument("--recover-minutes", type=float, default=_d("recover_minutes"),
                   help="whole-model recovery (distillation of every remaining weight against the original): "
                        "time budget in minutes, 0 turns it off (default: %(default)s)")
    p.add_argument("--recover-steps", type=_positive_int, default=None,
                   help="a fixed number of recovery steps instead of the time budget (reproducible anywhere)")
    p.add_argument("--recover-lr", type=float, default=_d("recover_lr"),
                   help="recovery's peak learning rate (default: sized to the model, 4e-4 times the RMS of its "
                        "weight matrices)")
    p.add_argument("--recover-tokens", type=_non_negative_int, default=_d("recover_tokens"),
                   help="on-policy tokens the pruned model writes for recovery (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--device-map", default=None, help="'auto' to shard a large model over GPUs and CPU")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    from slimlm.compress import CompressConfig, compress
    from slimlm.models import check_out, load_model

    cfg = CompressConfig(
        layers=args.layers, ratio=args.ratio if args.layers is None else None, method=args.method,
        block_choice=args.block_choice,
        width_ratio=args.width_ratio, width_heads=args.width_heads, width_windows=args.width_windows,
        replacement=args.replacement, calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len,
        epochs=args.epochs, lr=args.lr, train_loss=args.train_loss, lm_epochs=args.lm_epochs, seed=args.seed,
        kd_epochs=args.kd_epochs, kd_lr=args.kd_lr, recover_minutes=args.recover_minutes,
        recover_steps=args.recover_steps, recover_lr=args.recover_lr, recover_tokens=args.recover_tokens,
        progress=not args.quiet,
    )
    out = check_out(args.out, args.force, args.model)
    model, tok = load_model(args.model, device=args.device, device_map=args.device_map, dtype=args.dtype)
    result = compress(model, cfg, tokenizer=tok)
    result.report["source_model"] = args.model
    result.save(out, overwrite=args.force)
    r = result.report
    removed = r["selection"]["removed_layers"]
    if removed or "width" not in r["selection"]:
        print(f"removed layers {removed} ({len(removed)} of {r['layers_before']}), replacement: {cfg.replacement}")
    if "width" in r["selection"]:
        b, a = r["selection"]["width"]["before"], r["selection"]["width"]["after"]
        print(f"width pruning: MLP width {b['intermediate_size']} -> {a['intermediate_size']}, attention heads "
              f"{b['num_attention_heads']} -> {a['num_attention_heads']} (key/value {b['num_key_value_heads']} -> "
              f"{a['num_key_value_heads']})")
    print(f"parameters: {r['params_before']:,} -> {r['params_after']:,} "
          f"({100 * (1 - r['params_after'] / r['params_before']):.1f}% fewer)")
    mse = (r["training"].get("mse") or {}).get("history")
    if mse:
        best = r["training"]["mse"]["best_val_mse"]
        print(f"replacement validation MSE: {mse[0]['val_mse']:.5g} (initial) -> {best:.5g}")
    kd = r["training"].get("kd")
    if kd and kd.get("history"):
        print(f"distillation validation loss (cross-entropy vs the original's top-{kd['topk']}): "
              f"{kd['history'][0]['val_kd']:.4g} (after MSE) -> {kd['best_val_kd']:.4g}")
    rec = r["training"].get("recover")
    if rec and rec.get("history"):
        print(f"recovery: {rec['steps']} steps over {rec['calib_tokens']:,} calibration + {rec['onpolicy_tokens']:,} "
              f"on-policy tokens, held-out KL to the original {rec['history'][0]['val_kl']:.4g} -> "
              f"{rec['best_val_kl']:.4g}")
    q = r["quality"]
    if "ppl_dense" in q:
        print(f"quality kept on {q['heldout_tokens']:,} held-out calibration tokens: "
              f"perplexity {q['ppl_dense']:.2f} -> "
              f"{q['ppl_compressed']:.2f} ({q['ppl_compressed'] / q['ppl_dense']:.2f}x), "
              f"top-1 agreement with the original {100 * q['top1_agreement']:.1f}%")
    print(f"took {r['timings']['total_s']:.0f} s; wrote {out}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, zero-shot multiple choice, stability",
                       description="Evaluate MODEL: perplexity on a text file, multiple-choice accuracy, and "
                                   "stability against a reference model.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ppl", metavar="FILE", help="text file for perplexity")
    p.add_argument("--seq-len", type=_positive_int, default=1024, help="perplexity window length")
    p.add_argument("--windows", type=_positive_int, default=None, help="use only the first N windows")
    p.add_argument("--mc", action="append", default=[], metavar="NAME=FILE",
                   help="multiple-choice set (PIQA, SIQA or {context, choices, label} JSONL); repeatable")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N examples of each set")
    p.add_argument("--chat", metavar="FILE",
                   help="JSONL of instructions: greedy answers, their loop/end shares, length, and (with "
                        "--reference) the reference's NLL per token of them")
    p.add_argument("--chat-max-tokens", type=_positive_int, default=128, help="answer budget for --chat")
    p.add_argument("--reference", metavar="MODEL", help="reference model for stability and chat")
    p.add_argument("--json", metavar="OUT", help="write the numbers as JSON")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from slimlm.evaluate import EvalConfig, evaluate_model, format_table, mc_pairs
    from slimlm.models import check_report, write_file

    mc = mc_pairs(args.mc)
    cfg = EvalConfig(ppl=args.ppl, seq_len=args.seq_len, windows=args.windows, mc=mc, limit=args.limit,
                     reference=args.reference, device=args.device, chat=args.chat,
                     chat_max_tokens=args.chat_max_tokens, progress=not args.quiet)
    if args.json:
        check_report(args.json)
    results = evaluate_model(args.model, cfg)
    print(format_table(results))
    if args.json:
        write_file(args.json, json.dumps(results, indent=2))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r} ({exc})") from None


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="where a step's time and memory go, per layer and kind of work",
                       description="Profile prefill and decode steps of MODEL per decoder layer and kind of work "
                                   "(attention, MLP / FFN slot, norms, head, sampling, other), decode latency "
                                   "percentiles and memory, at each context and batch; --compare puts other "
                                   "models beside it with ratios.")
    p.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file or 'smollm2-135m'")
    p.add_argument("--compare", nargs="+", default=[], metavar="OTHER", help="models profiled the same way")
    p.add_argument("--backend", default="auto", help="auto (default: an ONNX export directory by onnx, anything "
                                                      "else by torch), torch or onnx")
    p.add_argument("--contexts", type=_int_list, default=(128, 512), help="prompt lengths (default: 128,512)")
    p.add_argument("--batch", type=_int_list, default=(1,), help="batch sizes (default: 1)")
    p.add_argument("--steps", type=_positive_int, default=64, help="decode steps timed after each context")
    p.add_argument("--repeats", type=_positive_int, default=3, help="profiled runs per phase and point")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--json", metavar="F", help="write the whole report as JSON")
    p.add_argument("--plots", metavar="DIR", help="write layers/latency/memory PNGs (and their JSON) to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from slimlm.errors import require
    from slimlm.models import check_device, check_report, check_writable, write_file
    from slimlm.profile import ProfileConfig, profile_models
    from slimlm.profile_plots import format_table, write_plots

    cfg = ProfileConfig(backend=args.backend, contexts=args.contexts, batches=args.batch, steps=args.steps,
                        repeats=args.repeats, threads=args.threads, device=args.device, progress=not args.quiet)
    check_device(args.device)
    if args.json:
        check_report(args.json)
    if args.plots:
        require("matplotlib", "plots")
        check_writable(args.plots)
    report = profile_models([args.model, *args.compare], cfg)
    print(format_table(report))
    if args.json:
        write_file(args.json, json.dumps(report, indent=1))
    if args.plots:
        print(f"wrote {', '.join(str(p) for p in write_plots(report, args.plots) if p.suffix == '.png')}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: compress | kernel | export | serve | pareto", add_help=False)
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    try:
        module = importlib.import_module(BENCHES[args.name])
    except ImportError as exc:
        raise SlimlmError(f"benchmark {args.name!r} is not available: {exc}") from exc
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    from slimlm import __version__

    parser = OneLineParser(prog="slimlm", description="Compress, quantize, export and serve causal LMs.")
    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    _add_eval(sub)
    for name in STAGE_CLIS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    _add_profile(sub)
    _add_bench(sub)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars and warnings would bury slimlm's own output (and its one-line errors)."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("SLIMLM_DEBUG"):  # bitsandbytes' import warns on AVX512-BF16 CPUs without `kernels`
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except SlimlmError as exc:
        print(f"slimlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimlm: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns an unexpected failure into one line
        if os.environ.get("SLIMLM_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"slimlm: internal error: {type(exc).__name__}: {msg} (SLIMLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
