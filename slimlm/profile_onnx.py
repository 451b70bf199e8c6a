"""`slimlm profile` of an ONNX export (`slimlm export onnx`), run by slimlm's ONNX Runtime path.

Time comes from onnxruntime's own profiler: a second session over the same graph runs with profiling on, and
every node's kernel time of a run is attributed to a decoder layer and a kind of work. A node's kind follows
from what it computes: GroupQueryAttention, RotaryEmbedding and attention's projections (a weight MatMul whose
output is not the vocabulary and that is not the MLP's) are attention; the MLP's projections (by their shapes:
N or K equal to the intermediate size) and activation are the MLP, or the FFN slot in a layer that has no
attention; (Skip)SimplifiedLayerNormalization is a norm; the embedding Gather and the vocabulary-wide MatMul are
the embedding and the head. Its layer is the layer of the nearest node before it, in execution order, whose
name scope (the exporter's `pkg.torch.onnx.name_scopes`) names one, which is how the traced graph is laid out:
layer after layer. Time of the run outside every node's kernel (onnxruntime's own work between kernels, the
feeds and fetches) and nodes of no layer (mask and position bookkeeping) is "other", and greedy sampling is
timed around the argmax. So the parts of a profiled step add up to it, and the unprofiled step beside it checks
that the profiler did not change what it measures (as for the torch backend). Parts are medians over the profiled
runs, kind by kind (`median_parts`), and decode runs `DECODE_RUNS` times as often as --repeats says: a decode
step of a small model is ~10 ms over ~300 kernels, where one descheduled kernel would otherwise move a part.
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.profile import (
    DECODE_RUNS,
    KINDS,
    PREFILL_RUNS,
    ProfileConfig,
    _phase,
    check_positions,
    growth,
    latency_stats,
    reset_peak_rss,
    rss_bytes,
    sources_from_info,
)

NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization", "RMSNormalization"}
ATTENTION = {"GroupQueryAttention", "RotaryEmbedding", "MultiHeadAttention", "Attention", "Softmax"}
WEIGHTS = {"MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul"}


def _scope_layer(node) -> int | None:
    """The decoder layer a traced node belongs to, from the exporter's name scopes ("layers.3.mlp"), or None."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            found = re.findall(r"layers\.(\d+)\b", prop.value)
            return int(found[-1]) if found else None
    return None


def _scope_kind(node) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            text = " ".join(scopes) if isinstance(scopes, list) else str(scopes)
            if re.search(r"layers\.\d+\.(mlp|ffn|feed_forward)", text):
                return "mlp"
            if re.search(r"layers\.\d+\.(self_attn|attn)", text):
                return "attention"
            if re.search(r"layers\.\d+\.\w*(norm|layernorm)", text):
                return "norm"
    return None


def node_map(path: Path, config) -> dict[str, tuple[int | None, str | None]]:
    """{node name: (layer from the name scopes or None, kind or None)} of the saved graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    vocab, inter = config.vocab_size, getattr(config, "intermediate_size", None)
    out = {}
    for node in graph.node:
        kind = None
        if node.op_type == "GatherBlockQuantized" or (
                node.op_type == "Gather" and node.input and len(shapes.get(node.input[0], [])) == 2):
            kind = "embedding"
        elif node.op_type in WEIGHTS:
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            dims = shapes.get(node.input[1] if len(node.input) > 1 else "", [])
            n, k = attrs.get("N", dims[-1] if len(dims) == 2 else None), attrs.get("K", dims[0] if dims else None)
            if n is not None and (n == vocab or node.output[0] == "logits"):
                kind = "head"
            elif inter and (k == inter or (n is not None and n % inter == 0 and n >= inter)):
                kind = "mlp"
            elif n is not None:
                kind = "attention"
        elif node.op_type in ATTENTION:
            kind = "attention"
        elif node.op_type in NORMS:
            kind = "norm"
        out[node.name] = (_scope_layer(node), kind or _scope_kind(node))
    return out


def attribute_run(events: list[dict], nodes: dict, n_layers: int, ffn_layers: set[int], run_ms: float,
                  sampling_ms: float) -> dict:
    """The parts of one profiled run (its node events in execution order) in the torch backend's format."""
    kinds = dict.fromkeys(KINDS, 0.0)
    layers = [{"index": i, "ms": 0.0, "kinds_ms": {}} for i in range(n_layers)]
    layer, prev_kind = None, None
    for e in events:
        ms = e["dur"] / 1e3
        name = e["name"][: -len("_kernel_time")]
        where, kind = nodes.get(name, (None, None))
        op = e.get("args", {}).get("op_name", "")
        if kind is None:  # a node onnxruntime made at load (a fusion): what it computes, else its neighbour's kind
            kind = ("norm" if op in NORMS else "attention" if op in ATTENTION
                    else prev_kind if op in ("QuickGelu", "Gelu", "FastGelu", "Mul", "Sigmoid", "Split") else None)
        if where is not None:
            layer = where
        if kind in ("embedding", "head"):
            kinds[kind] += ms
            layer = None if kind == "head" else layer
            prev_kind = kind
            continue
        if layer is None or layer >= n_layers or kind is None:
            kinds["other"] += ms
            continue
        if kind == "mlp" and layer in ffn_layers:
            kind = "ffn"
        part = layers[layer]["kinds_ms"]
        part[kind] = part.get(kind, 0.0) + ms
        layers[layer]["ms"] += ms
        prev_kind = kind
    for entry in layers:
        for kind, ms in entry["kinds_ms"].items():
            kinds[kind] += ms
    kinds["other"] += run_ms - sum(e["dur"] for e in events) / 1e3  # onnxruntime between and around kernels
    kinds["sampling"] += sampling_ms
    step = run_ms + sampling_ms
    for entry in layers:
        entry["kinds_ms"].setdefault("other", 0.0)
    return {"profiled_ms": step, "parts_sum_ms": sum(kinds.values()), "kinds_ms": kinds, "layers": layers}


class OnnxRunner:
    """Prefill and decode steps of one ONNX export (forward + greedy sampling), plain and profiled."""

    def __init__(self, path: str, threads: int | None, work: Path):
        from slimlm.export.runtime import OnnxCausalLM

        self.path = Path(path).expanduser()
        try:
            # the two sessions' runs alternate: neither's threads may spin on the cores the other runs on next
            self.plain = OnnxCausalLM(self.path, threads=threads, stop_spinning=True)
            self.prof = OnnxCausalLM(self.path, threads=threads, profile_prefix=str(work / "ort"), stop_spinning=True)
        except SlimlmError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise SlimlmError(f"cannot load the ONNX export {path}: {str(exc).splitlines()[0]}") from exc
        info = self.plain.info
        self.n_layers = len(info["kv_layers"]) + len(info.get("ffn_layers") or [])
        self.ffn_layers = set(info.get("ffn_layers") or [])
        self.kv_layers = list(info["kv_layers"])
        self.runs: list[tuple[float, float]] = []  # (wall ms of the profiled run, sampling ms), in order

    @staticmethod
    def _feeds(ids: np.ndarray, past):
        """A step's inputs: `ids` (B, T) after `past` (None: an empty cache), every row the same length."""
        b, t = ids.shape
        before = past[0][0].shape[2] if past else 0
        return ids, np.ones((b, before + t), np.int64), np.tile(np.arange(before, before + t), (b, 1)), past

    def timed(self, ids, past):
        """(next tokens, present, wall ms) of one step (forward + greedy pick) without the profiler."""
        t0 = time.perf_counter()
        logits, present = self.plain.step(*self._feeds(ids, past), last=1)
        nxt = logits[:, -1].numpy().argmax(-1)[:, None]
        return nxt, present, 1e3 * (time.perf_counter() - t0)

    def profiled(self, ids, past):
        """(next tokens, present, index of the run) of one step in the profiled session; `parts` attributes it."""
        t0 = time.perf_counter()
        logits, present = self.prof.step(*self._feeds(ids, past), last=1)
        run = 1e3 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        nxt = logits[:, -1].numpy().argmax(-1)[:, None]
        self.runs.append((run, 1e3 * (time.perf_counter() - t1)))
        return nxt, present, len(self.runs) - 1

    def parts(self, nodes: dict) -> list[dict]:
        """End the profiler and attribute each profiled run, in the order they ran."""
        trace = json.loads(Path(self.prof.session.end_profiling()).read_text())
        runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])
        kernels = sorted((e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                         key=lambda e: e["ts"])
        runs = runs[-len(self.runs):] if self.runs else []  # a warm-up run of the session may come first
        out = []
        for (wall, sampling), run in zip(self.runs, runs):
            inside = [e for e in kernels if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
            parts = attribute_run(inside, nodes, self.n_layers, self.ffn_layers, wall, sampling)
            out.append({**parts, "profiled_wall_ms": wall + sampling, "ort_model_run_ms": run["dur"] / 1e3})
        return out


def median_parts(runs: list[dict]) -> dict:
    """The parts of several profiled runs of one phase, kind by kind and layer by layer their median: one slow
    kernel in one run (a 10 ms decode step runs ~300 of them) then moves no part. The medians add up to the
    parts sum by construction; the profiled runs' own totals stay beside them."""
    import statistics

    kinds = {k: statistics.median(r["kinds_ms"][k] for r in runs) for k in KINDS}
    layers = []
    for i, first in enumerate(runs[0]["layers"]):
        names = sorted({k for r in runs for k in r["layers"][i]["kinds_ms"]})
        part = {k: statistics.median(r["layers"][i]["kinds_ms"].get(k, 0.0) for r in runs) for k in names}
        layers.append({"index": first["index"], "ms": sum(part.values()), "kinds_ms": part})
    total = sum(kinds.values())
    return {"profiled_ms": total, "parts_sum_ms": total, "kinds_ms": kinds, "layers": layers,
            "profiled_wall_ms": statistics.median(r["profiled_wall_ms"] for r in runs),
            "ort_model_run_ms": statistics.median(r["ort_model_run_ms"] for r in runs)}


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))


def profile_onnx(spec: str, cfg: ProfileConfig, bar=None) -> dict:
    """The report of one ONNX export: every (context, batch) point, in the torch backend's format."""
    from slimlm.export.runtime import is_onnx_dir
    from slimlm.models import read_slimlm_json

    if not is_onnx_dir(spec):
        raise SlimlmError(f"{spec} is not an ONNX export (no model.onnx): make one with "
                          f"`slimlm export onnx {spec} -o DIR` and profile DIR")
    with tempfile.TemporaryDirectory(prefix="slimlm-profile-") as tmp:
        runner = OnnxRunner(spec, cfg.threads, Path(tmp))
        lm = runner.plain
        limit = lm.max_positions or getattr(lm.config, "max_position_embeddings", None)
        check_positions(cfg, limit, spec)
        nodes = node_map(runner.path / lm.info.get("file", "model.onnx"), lm.config)
        record = read_slimlm_json(runner.path)
        sources, before = sources_from_info(record, runner.n_layers)
        elem = 2 if lm.kv_dtype == np.float16 else 4
        per_token = [0 if i in runner.ffn_layers else 2 * lm.kv_heads * lm.head_dim * elem
                     for i in range(runner.n_layers)]
        weights = (lm.info.get("config") or {}).get("weights", "?")
        report = {
            "model": spec, "backend": "onnx", "device": ",".join(lm.providers), "threads": lm.threads,
            "dtype": f"{weights} weights", "layers": [
                {"index": i, "kind": "ffn" if i in runner.ffn_layers else "decoder", "source_layers": sources[i]}
                for i in range(runner.n_layers)],
            "layers_before": before,
            "memory": {"weights_bytes": _weights_bytes(runner.path), "kv_bytes_per_token": sum(per_token),
                       "kv_bytes_per_token_by_layer": per_token, "rss_after_load_bytes": rss_bytes()},
            "points": [],
        }
        rng = np.random.default_rng(cfg.seed)
        vocab = lm.config.vocab_size
        pending = []  # per point: (indices of its profiled prefill runs, of its decode runs)
        warm = True
        for batch in cfg.batches:
            for context in cfg.contexts:
                ids = rng.integers(0, vocab, (batch, context), dtype=np.int64)
                if warm:
                    for one in (runner.timed, runner.profiled):  # first runs allocate: out of every figure
                        nxt, past = one(ids, None)[:2]
                        nxt, past = one(nxt, past)[:2]
                    runner.runs.clear()
                    warm = False
                scoped = reset_peak_rss()
                plain, prof = [], []
                for _ in range(PREFILL_RUNS * cfg.repeats):
                    plain.append(runner.timed(ids, None)[2])
                    nxt, past, k = runner.profiled(ids, None)
                    prof.append(k)
                kv = [0] * runner.n_layers
                for j, layer in enumerate(runner.kv_layers):
                    kv[layer] = int(past[j][0].nbytes + past[j][1].nbytes)
                pre_plain, pre_prof = plain, prof
                plain, prof = [], []
                for _ in range(DECODE_RUNS * cfg.repeats):  # short steps: more runs for the medians
                    nxt, past, ms = runner.timed(nxt, past)
                    plain.append(ms)
                    nxt, past, k = runner.profiled(nxt, past)
                    prof.append(k)
                series = []
                for _ in range(cfg.steps):
                    nxt, past, ms = runner.timed(nxt, past)
                    series.append(ms)
                end = sum(int(k.nbytes + v.nbytes) for k, v in past)
                pending.append((pre_plain, pre_prof, plain, prof))
                report["points"].append({
                    "context": context, "batch": batch,
                    "decode_latency": {"from_position": context + 2 * DECODE_RUNS * cfg.repeats,
                                       **latency_stats(series)},
                    "memory": {"kv_bytes": sum(kv), "kv_bytes_by_layer": kv,
                               "kv_bytes_expected": sum(per_token) * context * batch, "kv_bytes_end": end,
                               "rss_peak_bytes": rss_bytes(peak=True),
                               "rss_peak_scope": "point" if scoped else "process"},
                })
                if bar is not None:
                    bar.update(1)
        all_parts = runner.parts(nodes)
        for point, (pre_plain, pre_prof, dec_plain, dec_prof) in zip(report["points"], pending):
            for phase, plain, prof in (("prefill", pre_plain, pre_prof), ("decode", dec_plain, dec_prof)):
                runs = [all_parts[k] for k in prof]
                point[phase] = {**_phase(plain, [median_parts(runs)]),
                                "profiled_runs_ms": [r["profiled_ms"] for r in runs]}
        del runner
    report["decode_growth_ms_per_1k"] = growth(report["points"])
    return report
