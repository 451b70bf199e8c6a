"""The model card (`README.md`) of an output directory, from its `slimlm.json` record.

A Hub model card: YAML metadata (base_model, base_model_relation, library_name, pipeline_tag, tags) then what was
done (layers removed and what replaced them, width pruned, weights quantized), the quality figures the record
holds, how to load it, and the command that made it.

`base_model_relation`: the Hub recognises four values (adapter, merge, quantized, finetune). A quantized copy is
"quantized"; a compressed model (layers removed, a replacement and the layers around it trained against the
original) is "finetune", the Hub's value for weights derived by training, with the tags `pruned` and
`layer-pruning` saying how. `base_model` is written only when the source is a Hub id (or the built-in alias,
whose Hub id is known): the Hub refuses a local path there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

CARD = "README.md"
# built-in alias -> the Hub model it ships
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def command_line(argv: list[str] | None = None) -> str | None:
    """The `slimlm ...` command this process runs, or None when slimlm is used from Python."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return None
    prog = Path(argv[0])
    if prog.name == "slimlm" or (prog.name == "__main__.py" and prog.parent.name == "slimlm"):
        return shlex.join(["slimlm", *argv[1:]])
    return None


def base_model_id(source) -> str | None:
    """The Hub id of the source model, when there is one."""
    if not source:
        return None
    source = str(source)
    for alias, hub_id in ALIAS_HUB_IDS.items():
        if source == alias or Path(source).name.startswith(f"{alias}-") and "slimlm" in source:
            return hub_id
    if _HUB_ID.match(source) and not Path(source).expanduser().exists():
        return source
    return None


def _source(report: dict) -> str | None:
    return report.get("source_model") or (report.get("quantization") or {}).get("source_model")


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values]


def metadata(report: dict) -> dict:
    compressed = bool((report.get("selection") or {}).get("removed_layers") or report.get("width"))
    quantized = "quantization" in report
    tags = ["slimlm"]
    if compressed:
        layers = (report.get("selection") or {}).get("removed_layers")
        tags += ["pruned", "layer-pruning" if layers else "width-pruning"]
        method = (report.get("config") or {}).get("method")
        if method:
            tags.append(str(method))
    if quantized:
        tags += ["quantized", "bitsandbytes", str(report["quantization"].get("method", ""))]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": [t for t in tags if t]}
    base = base_model_id(_source(report))
    if base:
        meta["base_model"] = base
        if compressed or quantized:
            meta["base_model_relation"] = "finetune" if compressed else "quantized"
    return meta


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def body(report: dict, name: str, command: str | None) -> list[str]:
    lines = [f"# {name}", ""]
    source = _source(report)
    lines.append(f"Made with slimlm from `{source}`." if source else "Made with slimlm.")
    lines.append("")
    sel = report.get("selection") or {}
    removed = sel.get("removed_layers") or []
    cfg = report.get("config") or {}
    if removed:
        rep = (report.get("replacement") or {}).get("kind") or cfg.get("replacement")
        what = {"ffn": "one FFN block (a gated MLP with its own norm and residual; stored as a decoder layer whose "
                       "attention output is zero, so plain transformers runs it)",
                "layer": "one trained decoder layer", "linear": "a least-squares map folded into the previous "
                                                                   "layer's down projection (no extra layer)",
                "none": "nothing"}.get(rep, str(rep))
        lines += ["## What was removed", "",
                  f"- decoder layers {', '.join(map(str, removed))} ({len(removed)} of "
                  f"{report.get('layers_before', '?')}, chosen by {cfg.get('method', '?')}), replaced by {what}",
                  f"- layers: {report.get('layers_before', '?')} -> {report.get('layers_after', '?')}"]
        if report.get("params_before") and report.get("params_after"):
            b, a = report["params_before"], report["params_after"]
            lines.append(f"- parameters: {b / 1e6:.1f}M -> {a / 1e6:.1f}M ({_pct(1 - a / b)} fewer)")
        lines.append("")
    if report.get("width"):
        lines += ["## Width pruning", "", "```json", json.dumps(report["width"], indent=1, default=str)[:1500],
                  "```", ""]
    q = report.get("quantization")
    if q:
        lines += ["## Quantization", "", f"- bitsandbytes {q.get('method')}: weights of every linear layer except the "
                                         "output head"]
        if q.get("memory_ratio"):
            lines.append(f"- memory: {_pct(q['memory_ratio'])} of the unquantized model")
        lines.append("")
    rows = _quality_rows(report)
    if rows:
        lines += ["## Quality", "", "| measure | value |", "|---|---:|", *rows, ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")',
              "```", "", "Plain transformers (4.x and 5.x) loads it without remote code; `slimlm.load_model(\"PATH\")` "
              "runs an FFN replacement as its lean module (no attention, no KV cache).", ""]
    settings = cfg or (q or {}).get("config")
    if command:
        lines += ["## How it was made", "", "```", command, "```"]
    elif settings:
        lines += ["## How it was made", "", "From Python, with these settings (`slimlm.json` holds the full record):",
                  "", "```json", json.dumps(settings, indent=1, default=str), "```"]
    versions = report.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)]
    return lines + [""]


def _quality_rows(report: dict) -> list[str]:
    rows = []
    qual = report.get("quality") or {}
    if qual.get("ppl_dense") and qual.get("ppl_compressed"):
        where = f"{qual.get('heldout_windows', '?')} held-out calibration windows, {qual.get('heldout_tokens', '?')} " \
                "tokens"
        rows += [f"| perplexity, original ({where}) | {qual['ppl_dense']:.2f} |",
                 f"| perplexity, this model | {qual['ppl_compressed']:.2f} "
                 f"({qual['ppl_compressed'] / qual['ppl_dense']:.2f}x) |"]
        if qual.get("top1_agreement") is not None:
            rows.append(f"| next-token agreement with the original | {_pct(qual['top1_agreement'])} |")
    ppl = (report.get("quantization") or {}).get("perplexity")
    if ppl:
        rows.append(f"| perplexity before -> after quantization ({ppl.get('windows')} windows of {ppl.get('seq_len')} "
                    f"tokens of `{Path(str(ppl.get('text'))).name}`) | {ppl['before']:.2f} -> {ppl['after']:.2f} "
                    f"({100 * ppl['change']:+.1f}%) |")
    return rows


def model_card(report: dict, name: str, command: str | None = None) -> str:
    meta = metadata(report)
    head = ["---"]
    for key, value in meta.items():
        head += _yaml_list(key, value) if isinstance(value, list) else [f"{key}: {json.dumps(value)}"]
    head.append("---")
    return "\n".join(head + [""] + body(report, name, command))


def write_card(directory: str | os.PathLike, report: dict | None, name: str | None = None,
               command: str | None = None) -> Path:
    """Write `directory`/README.md for the record `report` (None: a plain copy) titled `name` (default: the
    directory's name); `command` defaults to this process's `slimlm ...` command line."""
    directory = Path(directory)
    name = name or directory.name
    path = directory / CARD
    if report is None:  # a plain copy (e.g. the built-in model converted once): no stage made it
        command = None
    else:
        command = command or command_line()
    path.write_text(model_card(report or {}, name, command), encoding="utf-8")
    return path
