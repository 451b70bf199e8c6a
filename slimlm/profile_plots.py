"""What `slimlm profile` shows: the terminal table and the PNG figures (with the JSON each one is drawn from).

The table puts the models side by side, one column each, with a ratio column against the first for every
later one: per kind of work for prefill and a decode step at each point (and the sum check), decode latency
percentiles, memory, and per layer (original layer numbering, so a compressed model's FFN slot sits where
its removed block was). The figures: per-layer stacked bars, step latency against context, memory against
context. matplotlib is imported inside the plotting function.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from slimlm.profile import CHECK_TOLERANCE, KINDS, PHASES

LAYER_KINDS = ("attention", "mlp", "ffn", "norm", "other")
COLORS = {"attention": "#4c72b0", "mlp": "#dd8452", "ffn": "#c44e52", "norm": "#8172b3", "other": "#937860",
          "embedding": "#55a868", "head": "#da8bc3", "sampling": "#ccb974"}


def _mb(n) -> str:
    """Bytes in the unit that keeps 1-3 digits before the point."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


_kb = _mb


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def describe(m: dict) -> str:
    ffn = [layer for layer in m["layers"] if layer["kind"] == "ffn"]
    slots = ", ".join(f"ffn slot {s['index']} for layers {s['source_layers'][0]}-{s['source_layers'][-1]}"
                      for s in ffn)
    where = f"{m['backend']} {m.get('device', '')} {m.get('dtype', '')}".strip()
    return (f"{m['model']}: {where}, {len(m['layers'])} layers{' (' + slots + ')' if slots else ''}, "
            f"weights {_mb(m['memory']['weights_bytes'])}, KV cache {_kb(m['memory']['kv_bytes_per_token'])}/token")


def _grid(title: str, heads: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [[title] + heads] + rows) for i in range(len(heads) + 1)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(title, *heads)] + [fmt.format(*r) for r in rows]


def _columns(report: dict) -> tuple[list[str], list[tuple[int, int | None]]]:
    """Column heads and (model index, compare index or None) for each column: base, then other, ratio..."""
    heads, cols = [report["models"][0]["model"]], [(0, None)]
    for j, m in enumerate(report["models"][1:]):
        heads += [m["model"], "ratio"]
        cols += [(j + 1, None), (j + 1, j)]
    return heads, cols


def format_table(report: dict) -> str:
    models = report["models"]
    heads, cols = _columns(report)
    lines = [describe(m) for m in models]
    points = [(p["context"], p["batch"]) for p in models[0]["points"]]

    def at(m, key):
        return next((p for p in m["points"] if (p["context"], p["batch"]) == key), None)

    def ratio_at(j, key):
        return next((r for r in report["compare"][j]["points"] if (r["context"], r["batch"]) == key), None)

    for key in points:
        for phase in PHASES:
            rows = []
            for kind in KINDS + ("parts sum", "step", "check"):
                row = [f"  {kind}"]
                for mi, cj in cols:
                    p = at(models[mi], key)
                    ph = p and p[phase]
                    if cj is not None:
                        r = ratio_at(cj, key)
                        val = None
                        if r and kind in KINDS:
                            val = r[phase]["kinds"][kind]
                        elif r and kind == "step":
                            val = r[phase]["step"]
                        row.append(_x(val) if kind != "check" else "")
                    elif ph is None:
                        row.append("-")
                    elif kind == "ffn" and not any(layer["kind"] == "ffn" for layer in models[mi]["layers"]):
                        row.append("-")
                    elif kind in KINDS:
                        ms = ph["kinds_ms"][kind]
                        row.append(f"{ms:.2f} ms {100 * ms / ph['parts_sum_ms']:5.1f}%")
                    elif kind == "parts sum":
                        row.append(f"{ph['parts_sum_ms']:.2f} ms")
                    elif kind == "step":
                        row.append(f"{ph['step_ms']:.2f} ms")
                    else:
                        row.append(f"{100 * ph['check']:+.1f}% {'ok' if ph['check_ok'] else 'OVER'}")
                rows.append(row)
            what = f"prefill {key[0]} tokens" if phase == "prefill" else f"decode step at {key[0]}"
            lines += ["", *_grid(f"{what}, batch {key[1]}", heads, rows)]
    lines += ["", f"  step: median wall time without the profiler; check: parts sum / step - 1 (torch: the median "
                  f"over profiled runs, each against the unprofiled run just before it), within "
                  f"{100 * CHECK_TOLERANCE:.0f}% = ok"]
    rows = []
    for key in points:
        row = [f"  context {key[0]}, batch {key[1]}"]
        for mi, cj in cols:
            p = at(models[mi], key)
            if cj is not None:
                r = ratio_at(cj, key)
                row.append(_x(r and r["decode_latency"]["p50_ms"]))
            else:
                d = p and p["decode_latency"]
                row.append("-" if not d else f"{d['p50_ms']:.2f} / {d['p90_ms']:.2f} / {d['p99_ms']:.2f}")
        rows.append(row)
    for batch in sorted({k[1] for k in points}):
        row = [f"  growth per 1k context, batch {batch}"]
        for mi, cj in cols:
            g = models[mi].get("decode_growth_ms_per_1k", {}).get(str(batch))
            row.append("" if cj is not None else ("-" if g is None else f"{g:+.2f} ms"))
        rows.append(row)
    steps = models[0]["points"][0]["decode_latency"]["steps"]
    lines += ["", *_grid(f"decode step ms p50 / p90 / p99 ({steps} steps)", heads, rows)]
    rows = []
    for label, fn, rfn in (
        ("  weights", lambda m: _mb(m["memory"]["weights_bytes"]), lambda c: c["memory"]["weights_bytes"]),
        ("  KV cache per token", lambda m: _kb(m["memory"]["kv_bytes_per_token"]),
         lambda c: c["memory"]["kv_bytes_per_token"]),
    ):
        rows.append([label] + [_x(rfn(report["compare"][cj])) if cj is not None else fn(models[mi])
                               for mi, cj in cols])
    for key in points:
        row = [f"  KV cache at {key[0]}, batch {key[1]}"]
        for mi, cj in cols:
            p = at(models[mi], key)
            row.append(_x((ratio_at(cj, key) or {}).get("kv_bytes")) if cj is not None
                       else _mb(p and p["memory"]["kv_bytes"]))
        rows.append(row)
        row = [f"  peak RSS at {key[0]}, batch {key[1]}"]
        for mi, cj in cols:
            p = at(models[mi], key)
            row.append("" if cj is not None else _mb(p and p["memory"]["rss_peak_bytes"]))
        rows.append(row)
        row = [f"  step tensors peak at {key[0]}, batch {key[1]} (prefill / decode)"]
        for mi, cj in cols:
            alloc = (at(models[mi], key) or {}).get("memory", {}).get("step_alloc_peak_bytes") or {}
            both = [alloc.get("prefill"), alloc.get("decode")]
            row.append("" if cj is not None else "-" if None in both else f"{_mb(both[0])} / {_mb(both[1])}")
        rows.append(row)
    lines += ["", *_grid("memory", heads, rows)]
    lines += ["", *layer_table(report)]
    return "\n".join(lines)


def aligned_layers(report: dict, phase: str, key) -> tuple[list[int], list[list]]:
    """Rows by original layer index: for each model, (layer dict, parts) at that index, "removed" inside a
    replaced block, or None."""
    n = max(m.get("layers_before") or len(m["layers"]) for m in report["models"])
    table = [[None] * len(report["models"]) for _ in range(n)]
    for j, m in enumerate(report["models"]):
        p = next((p for p in m["points"] if (p["context"], p["batch"]) == key), None)
        if p is None:
            continue
        for layer, parts in zip(m["layers"], p[phase]["layers"]):
            src = layer["source_layers"]
            table[src[0]][j] = (layer, parts)
            for i in src[1:]:
                table[i][j] = "removed"
        if m.get("layers_before"):
            kept = {i for layer in m["layers"] for i in layer["source_layers"]}
            for i in range(m["layers_before"]):
                if i not in kept:
                    table[i][j] = "removed"
    return list(range(n)), table


def layer_table(report: dict) -> list[str]:
    m0 = report["models"][0]
    key = (m0["points"][-1]["context"], m0["points"][0]["batch"])
    idx, table = aligned_layers(report, "decode", key)
    heads = [m["model"] for m in report["models"]]
    rows = []
    for i, cells in zip(idx, table):
        row = [f"  {i}"]
        for cell in cells:
            if cell is None:
                row.append("-")
            elif cell == "removed":
                row.append("removed")
            else:
                layer, parts = cell
                k = parts["kinds_ms"]
                tag = f" ffn slot {layer['index']}" if layer["kind"] == "ffn" else ""
                row.append(f"{parts['ms']:.2f} ms ({k.get('attention', 0):.2f} attn){tag}")
        rows.append(row)
    return _grid(f"per layer, decode step at {key[0]}, batch {key[1]}", heads, rows)


# --------------------------------------------------------------------------------------------------
# Figures


def figure_data(report: dict) -> dict[str, dict]:
    """The data of every figure, by file stem; each is written as STEM.json beside STEM.png."""
    m0 = report["models"][0]
    key = (m0["points"][-1]["context"], m0["points"][0]["batch"])
    layers = {"context": key[0], "batch": key[1], "phases": {}}
    for phase in PHASES:
        idx, table = aligned_layers(report, phase, key)
        layers["phases"][phase] = {"layer": idx, "models": [
            {"model": m["model"], "rows": [
                None if cell is None else "removed" if cell == "removed" else
                {"index": cell[0]["index"], "kind": cell[0]["kind"], "ms": cell[1]["ms"],
                 "kinds_ms": {k: cell[1]["kinds_ms"].get(k, 0.0) for k in LAYER_KINDS}}
                for cell in (row[j] for row in table)]}
            for j, m in enumerate(report["models"])]}
    latency = {"models": [{"model": m["model"], "points": [
        {"context": p["context"], "batch": p["batch"], "prefill_ms": p["prefill"]["step_ms"],
         **{q: p["decode_latency"][q] for q in ("p50_ms", "p90_ms", "p99_ms", "from_position", "series_ms")}}
        for p in m["points"]]} for m in report["models"]]}
    memory = {"models": [{"model": m["model"], "weights_bytes": m["memory"]["weights_bytes"], "points": [
        {"context": p["context"], "batch": p["batch"], "kv_bytes": p["memory"]["kv_bytes"],
         "rss_peak_bytes": p["memory"]["rss_peak_bytes"]} for p in m["points"]]} for m in report["models"]]}
    return {"layers": layers, "latency": latency, "memory": memory}


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_plots(report: dict, out_dir) -> list[Path]:
    """Write layers.png, latency.png and memory.png (each with its .json) into `out_dir`."""
    from slimlm.errors import require
    from slimlm.models import write_file

    matplotlib = require("matplotlib", "plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = figure_data(report)
    written = []
    for stem, draw in (("layers", _draw_layers), ("latency", _draw_latency), ("memory", _draw_memory)):
        fig = draw(plt, data[stem])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        _write_bytes(out_dir / f"{stem}.png", buf.getvalue())
        write_file(out_dir / f"{stem}.json", json.dumps(data[stem], indent=1))
        written += [out_dir / f"{stem}.png", out_dir / f"{stem}.json"]
    return written


def _draw_layers(plt, data):
    phases = data["phases"]
    n_models = len(phases["decode"]["models"])
    n_layers = len(phases["decode"]["layer"])
    fig, axes = plt.subplots(len(phases), 1, figsize=(max(8, 0.35 * n_layers * max(1, n_models)), 7), squeeze=False)
    width = 0.8 / n_models
    for ax, (phase, d) in zip(axes[:, 0], phases.items()):
        for j, m in enumerate(d["models"]):
            xs = [i - 0.4 + width * (j + 0.5) for i in d["layer"]]
            bottom = [0.0] * n_layers
            for kind in LAYER_KINDS:
                h = [r["kinds_ms"][kind] if isinstance(r, dict) else 0.0 for r in m["rows"]]
                ax.bar(xs, h, width, bottom=bottom, color=COLORS[kind], edgecolor="white", linewidth=0.3,
                       hatch="//" if j else None, label=kind if j == 0 else None)
                bottom = [b + v for b, v in zip(bottom, h)]
            top = max([r["ms"] for r in m["rows"] if isinstance(r, dict)] or [0.0])
            for x, r in zip(xs, m["rows"]):
                if r == "removed":
                    ax.bar(x, top, width, color="none", edgecolor="grey", hatch="xx", linewidth=0.5)
                    ax.text(x, top * 0.02, "removed", rotation=90, fontsize=6, ha="center", va="bottom")
        names = ", ".join(m["model"] + (" (hatched)" if j else "") for j, m in enumerate(d["models"]))
        ax.set_title(f"{phase}: context {data['context']}, batch {data['batch']} ({names})", fontsize=9)
        ax.set_xlabel("decoder layer (original numbering)")
        ax.set_ylabel("ms")
        ax.set_xticks(d["layer"])
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, ncol=len(LAYER_KINDS))
    fig.tight_layout()
    return fig


def _draw_latency(plt, data):
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in data["models"]:
        for batch in sorted({p["batch"] for p in m["points"]}):
            pts = [p for p in m["points"] if p["batch"] == batch]
            label = f"{m['model']} (batch {batch})"
            xs = [p["context"] for p in pts]
            line = a.plot(xs, [p["p50_ms"] for p in pts], marker="o", label=label)[0]
            a.fill_between(xs, [p["p50_ms"] for p in pts], [p["p99_ms"] for p in pts], alpha=0.15,
                           color=line.get_color())
            b.plot(xs, [p["prefill_ms"] for p in pts], marker="o", label=label)
            for k, p in enumerate(pts):
                pos = range(p["from_position"], p["from_position"] + len(p["series_ms"]))
                c.plot(list(pos), p["series_ms"], lw=0.8, color=line.get_color(), label=label if k == 0 else None)
    a.set_title("decode step: p50 (band to p99)", fontsize=9)
    b.set_title("prefill (prompt of that length)", fontsize=9)
    c.set_title("each decode step of the generations", fontsize=9)
    for ax, xl in ((a, "context (tokens)"), (b, "context (tokens)"), (c, "position (tokens)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _draw_memory(plt, data):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in data["models"]:
        for batch in sorted({p["batch"] for p in m["points"]}):
            pts = [p for p in m["points"] if p["batch"] == batch]
            xs = [p["context"] for p in pts]
            line = ax.plot(xs, [(m["weights_bytes"] + p["kv_bytes"]) / 1e6 for p in pts], marker="o",
                           label=f"{m['model']} weights + KV (batch {batch})")[0]
            if all(p["rss_peak_bytes"] for p in pts):
                ax.plot(xs, [p["rss_peak_bytes"] / 1e6 for p in pts], ls="--", marker="x", color=line.get_color(),
                        label=f"{m['model']} process peak RSS (batch {batch})")
        ax.axhline(m["weights_bytes"] / 1e6, ls=":", lw=0.8, color=line.get_color())
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MB")
    ax.set_title("memory against context (dotted: weights alone)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
