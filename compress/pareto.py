"""`slimlm bench pareto`: the trade-off a deployer chooses from, quality against speed.

The model is compressed at several layer counts (`--layers 0,2,4,7,10`; 0 is the dense model itself), each
point exported in each deployment form (`--forms`: ONNX Runtime int8, the int4 mix, every weight at 4 bits),
and every (point, form) row measured the way `slimlm bench export` measures it: a fresh worker process per
row, rows alternating over `--repeats` rounds, medians of batch-1 decode tok/s, prefill tok/s, perplexity on
the first windows of `--ppl`, size on disk, peak RSS. With `--chat FILE` each point's greedy chat answers are
judged against the dense model's (slimlm.chat_eval: loop and end shares, reference NLL per token; measured on
the point's float32 weights, so they do not move with the form).

`--width 0.16,4:0.08` adds width-pruned points beside the layer counts (compress/width.py): a ratio alone is width
pruning of the dense model ("width 0.16"), LAYERS:RATIO removes that many layers first ("-4 layers + width 0.08").

Compressed points are built once into --work (reused while their compression settings are the same).
Writes a table, a JSON (--json) and a PNG of perplexity against decode speed with the Pareto frontier drawn
(--plot): a row is on the frontier when no other row decodes at least as fast at no higher perplexity.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from slimlm.cli import OneLineParser, _positive_int

FORMS = ("ort-int8", "ort-int4", "ort-int4+all4")


def _int_list(text: str) -> list[int]:
    from slimlm.errors import SlimlmError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlimlmError(f"--layers takes comma-separated layer counts, got {text!r}") from None
    if not values or any(v < 0 for v in values) or len(set(values)) < len(values):
        raise SlimlmError(f"--layers takes distinct counts >= 0, got {text!r}")
    return sorted(values)


def _options(items: list[str]) -> dict:
    """--compress-option KEY=VALUE pairs for CompressConfig (values read as JSON where they parse)."""
    from dataclasses import fields

    from slimlm.compress.config import CompressConfig
    from slimlm.errors import SlimlmError

    known = {f.name for f in fields(CompressConfig)} - {"layers", "ratio", "progress"}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise SlimlmError(f"--compress-option takes KEY=VALUE with KEY one of {', '.join(sorted(known))}, "
                              f"got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _width_list(text: str) -> list[tuple[int, float]]:
    """--width: comma-separated RATIO (width alone) or LAYERS:RATIO (layers removed first)."""
    from slimlm.errors import SlimlmError

    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        layers, _, ratio = item.rpartition(":")
        try:
            n, r = int(layers or 0), float(ratio)
        except ValueError:
            raise SlimlmError(f"--width takes RATIO or LAYERS:RATIO items, got {item!r}") from None
        if not 0 < r < 1 or n < 0:
            raise SlimlmError(f"--width ratios must be in (0, 1) and layers >= 0, got {item!r}")
        out.append((n, r))
    return out


def _label(key) -> str:
    """A point's name: 0 "dense", n "-n layers", (0, r) "width r", (n, r) "-n layers + width r"."""
    if isinstance(key, int):
        return f"-{key} layers" if key else "dense"
    n, r = key
    return f"-{n} layers + width {r:g}" if n else f"width {r:g}"


def main(argv=None) -> int:
    from slimlm.export.bench import DEFAULT_PPL

    p = OneLineParser(prog="slimlm bench pareto", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense model (default: %(default)s)")
    p.add_argument("--layers", default="0,2,4,7,10", help="layer counts to remove, 0 = dense (default: %(default)s)")
    p.add_argument("--width", default="", metavar="R|N:R,...",
                   help="width-pruned points too: a ratio of the parameters, alone or after N layers removed")
    p.add_argument("--forms", default=",".join(FORMS), help="deployment forms, from `slimlm bench export`'s "
                                                            "backends (default: %(default)s)")
    p.add_argument("--compress-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a CompressConfig field for every compressed point (repeatable), e.g. recover_minutes=2")
    p.add_argument("--ppl", default=str(DEFAULT_PPL), help="text file for perplexity")
    p.add_argument("--windows", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=1024)
    p.add_argument("--chat", default=None, metavar="FILE", help="JSONL of instructions for the chat figures")
    p.add_argument("--chat-max-tokens", type=_positive_int, default=128)
    p.add_argument("--prefill", type=_positive_int, default=512)
    p.add_argument("--decode", type=_positive_int, default=128)
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--work", default=None, help="where points and artefacts are built (default: the slimlm cache)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write the perplexity-vs-speed PNG here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from slimlm.chat_eval import load_chat
    from slimlm.data import read_utf8
    from slimlm.errors import SlimlmError
    from slimlm.export.bench import BACKENDS, _variant_ok
    from slimlm.models import cache_dir, check_report, resolve

    layers = _int_list(args.layers)
    widths = _width_list(args.width)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    bad = [f for f in forms if (f not in BACKENDS and not _variant_ok(f)) or f == "llama-cpp"]
    if not forms or bad:
        raise SlimlmError(f"unknown forms {bad}: use backends of `slimlm bench export` such as {', '.join(FORMS)}")
    options = _options(args.compress_option)
    resolve(args.model)
    if not Path(args.ppl).is_file():
        raise SlimlmError(f"perplexity text not found: {args.ppl}")
    read_utf8(args.ppl, "perplexity file")
    convs = load_chat(args.chat) if args.chat else None
    for path in (args.json, args.plot):
        if path:
            check_report(path, "--json" if path == args.json else "--plot")
    work = Path(args.work or cache_dir() / "bench-pareto")
    t0 = time.perf_counter()
    points = {n: _point(args.model, n, options, work, not args.quiet) for n in layers}
    points.update({w: _point(args.model, w, options, work, not args.quiet) for w in widths})
    chat = _chat_figures(args.model, points, convs, args.chat_max_tokens, not args.quiet) if convs else {}
    rows = _measure(points, forms, work, args)
    for row in rows:
        row["chat"] = chat.get(row.pop("key"))
    _frontier(rows)
    _print_table(rows)
    from slimlm.export.bench import _machine

    out = {"bench": "pareto", "model": args.model, "results": rows, "compress_options": options,
           "settings": {k: v for k, v in vars(args).items()}, "machine": _machine(args.threads),
           "seconds": round(time.perf_counter() - t0, 1)}
    from slimlm.models import write_file

    if args.json:
        write_file(args.json, json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot_pareto(rows, args.plot, f"{args.model}: perplexity against batch-1 decode speed")
    print(json.dumps(out))
    return 0


def _point(model: str, key, options: dict, work: Path, progress: bool) -> dict:
    """The model with n layers removed (key n; built into work/layers-N once; n = 0 is the model itself), or width
    pruned by ratio r after n layers removed (key (n, r); into work/width-N-R)."""
    from slimlm.export.bench import _hf_dir
    from slimlm.models import read_slimlm_json

    n, ratio = (key, None) if isinstance(key, int) else key
    if n == 0 and ratio is None:
        path = _hf_dir(model)
        return {"spec": path, "layers_removed": 0, "width_ratio": None, "params": _params_of(path),
                "compress_s": 0.0}
    target = work / (f"layers-{n}" if ratio is None else f"width-{n}-{ratio:g}")
    wanted = {**options, "layers": n} if ratio is None else {
        **options, "layers": n or None, "width_ratio": ratio, **({} if n else {"method": "width"})}
    info = read_slimlm_json(target) if (target / "config.json").is_file() else {}
    done = info.get("pareto_options") == wanted
    if not done:
        from slimlm.compress import CompressConfig, compress
        from slimlm.models import load_model

        print(f"compress {model}: {_label(key)} ...", file=sys.stderr, flush=True)
        m, tok = load_model(model)
        result = compress(m, CompressConfig(progress=progress, **wanted), tokenizer=tok)
        result.report["pareto_options"] = wanted
        result.report["source_model"] = model
        result.save(target, overwrite=True)
        info = result.report
        del m
    return {"spec": str(target), "layers_removed": n, "width_ratio": ratio,
            "params": info.get("params_after") or _params_of(str(target)),
            "compress_s": round(info.get("timings", {}).get("total_s", 0.0), 1)}


def _params_of(path: str) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return total


def _chat_figures(model: str, points: dict, convs, max_tokens: int, progress: bool) -> dict:
    from slimlm.chat_eval import answer_nll, chat_figures, greedy_answers
    from slimlm.models import load_model

    ref, ref_tok = load_model(points[0]["spec"] if 0 in points else model)
    out = {}
    for n, point in points.items():
        print(f"chat: {_label(n)} ...", file=sys.stderr, flush=True)
        m, tok = (ref, ref_tok) if n == 0 else load_model(point["spec"])
        answers = greedy_answers(m, tok, convs, max_tokens, progress=progress)
        figs = chat_figures(answers, tok, convs)
        figs["reference_nll"] = answer_nll(ref, answers, tok.eos_token_id)
        figs.pop("examples", None)
        out[n] = figs
    return out


def _measure(points: dict, forms: list[str], work: Path, args) -> list[dict]:
    from slimlm.errors import SlimlmError
    from slimlm.export.bench import _run_worker, _summarise, prepare

    rows = []
    for n, point in points.items():
        for form in forms:
            print(f"prepare {_label(n)} / {form} ...", file=sys.stderr, flush=True)
            try:
                where = f"layers-{n}-forms" if isinstance(n, int) else f"{Path(point['spec']).name}-forms"
                artefact = prepare(point["spec"], form, work / where)
            except SlimlmError as exc:  # a form whose validation fails is reported, the others measured
                print(f"skip {_label(n)} / {form}: {exc}", file=sys.stderr)
                continue
            rows.append({"model": _label(n), "spec": point["spec"], "backend": form, "key": n,
                         "artefact": str(artefact), "runs": [], "layers_removed": point["layers_removed"],
                         "width_ratio": point["width_ratio"], "params": point["params"],
                         "compress_s": point["compress_s"]})
    for r in range(args.repeats):
        for row in rows:
            job = {"backend": row["backend"], "artefact": row["artefact"], "threads": args.threads,
                   "prefill": args.prefill, "decode": args.decode, "ppl": args.ppl if r == 0 else None,
                   "windows": args.windows, "seq_len": args.seq_len}
            print(f"run {r + 1}/{args.repeats} {row['model']}/{row['backend']} ...", file=sys.stderr, flush=True)
            row["runs"].append(_run_worker(job))
    out = []
    for row in rows:
        summary = _summarise(dict(row))
        summary.update({k: row[k] for k in ("key", "layers_removed", "width_ratio", "params", "compress_s")})
        out.append(summary)
    return out


def _frontier(rows: list[dict]) -> None:
    """Mark rows no other row beats on both decode speed and perplexity."""
    ok = [r for r in rows if r.get("decode_tok_s") and r.get("ppl")]
    for r in rows:
        r["frontier"] = r in ok and not any(
            o is not r and o["decode_tok_s"] >= r["decode_tok_s"] and o["ppl"] <= r["ppl"]
            and (o["decode_tok_s"] > r["decode_tok_s"] or o["ppl"] < r["ppl"]) for o in ok)


def _print_table(rows: list[dict]) -> None:
    head = ("point", "form", "params M", "disk MB", "ppl", "decode tok/s", "prefill tok/s", "loops", "ends",
            "ref NLL", "frontier")
    lines = [head]
    for r in rows:
        c = r.get("chat") or {}
        lines.append((r["model"], r["backend"], f"{r['params'] / 1e6:.1f}", _fmt(r.get("disk_mb"), ".0f"),
                      _fmt(r.get("ppl"), ".2f"), _fmt(r.get("decode_tok_s"), ".1f"),
                      _fmt(r.get("prefill_tok_s"), ".0f"), _fmt(c.get("loop_rate"), ".2f"),
                      _fmt(c.get("end_rate"), ".2f"), _fmt(c.get("reference_nll"), ".3f"),
                      "*" if r.get("frontier") else ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def plot_pareto(rows: list[dict], path, title: str) -> None:
    """Perplexity (log) against decode tok/s, one marker per form, points labelled by layers removed, the
    frontier joined by a line."""
    from slimlm.compress.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^vP*X"
    forms = list(dict.fromkeys(r["backend"] for r in rows))
    for i, form in enumerate(forms):
        pts = [r for r in rows if r["backend"] == form and r.get("ppl") and r.get("decode_tok_s")]
        ax.scatter([r["decode_tok_s"] for r in pts], [r["ppl"] for r in pts], marker=markers[i % len(markers)],
                   s=50, label=form, zorder=3)
        for r in pts:
            ax.annotate(r["model"], (r["decode_tok_s"], r["ppl"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    front = sorted((r for r in rows if r.get("frontier")), key=lambda r: r["decode_tok_s"])
    if front:
        ax.plot([r["decode_tok_s"] for r in front], [r["ppl"] for r in front], color="black", lw=1, ls="--",
                label="Pareto frontier", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode tok/s (batch 1, higher is better)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
