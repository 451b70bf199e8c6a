"""`slimlm bench export`: the deployment forms of dense and compressed models side by side.

Rows: each model (--model NAME=SPEC, repeatable) x each backend (--backends): torch-fp32, bnb-int8,
bnb-nf4, ort-fp32, ort-int8, ort-int4, and llama-cpp (the model's GGUF through llama-cpp-python, only
when that package is installed and the model is a .gguf or the built-in alias). llama-cpp-q8_0 and llama-cpp-q4_k_m
run any model through `slimlm export gguf` (q4_k_m by llama.cpp's own quantizer), so a compressed model and its
original meet in llama.cpp itself; they too need llama-cpp-python. genai-int4 and genai-int4-mixed are the peer
rows of onnxruntime-genai: the same model directory through its model builder (`-p int4 -e cpu`, the default
all-4-bit or `algo_config=k_quant_mixed`) and run by its `og.Generator`, in a Python that has onnxruntime-genai
(this one, or the one SLIMLM_GENAI_PYTHON names: it pins its own onnxruntime). An ONNX backend with the suffix
"+plain" (e.g. ort-int4+plain) is exported with `--attention plain`, to set the fused attention beside it, and
ort-int4+all4 with every weight at 4 bits (`--int4-keep8 none`), to set the default 8-bit exceptions beside it;
ort-int4+mixed keeps those exceptions in llama.cpp's "more bits" layers only (`--int4-keep8-layers mixed`);
ort-int4+qat trains the model on its 4-bit grid first (`--qat-minutes 5`: every decoder matrix at 4 bits, the head at
8, round to nearest on the trained grid);
"+stepped" runs the same export with the cache passed in and out at every decode step (`generate(share_buffer=False)`)
instead of kept in place, to set that runtime path beside the default.
Columns: size on disk, peak RSS, perplexity on the first --windows windows of --seq-len tokens of --ppl, prefill tok/s
(--prefill tokens, batch 1) and decode tok/s (batch 1, --decode tokens, greedy, no early stop).

Artefacts (bnb directories, ONNX exports) are built first into --work (kept, reused by later runs).
Every measurement then runs in a fresh worker process so that peak RSS belongs to one backend; the
rows run alternately, --repeats times round-robin, so slow drifts of the machine hit all rows alike.
Timings: one warm-up excluded, wall clock around synchronous calls, medians over the repeats.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from slimlm.cli import OneLineParser, positive_int

BACKENDS = ("torch-fp32", "bnb-int8", "bnb-nf4", "ort-fp32", "ort-int8", "ort-int4", "llama-cpp", "llama-cpp-q8_0",
            "llama-cpp-q4_k_m", "genai-int4", "genai-int4-mixed")
# peer rows: onnxruntime-genai's model builder (`-p int4 -e cpu`, its default or k_quant_mixed), run by og.Generator
GENAI_ROWS = {"genai-int4": [], "genai-int4-mixed": ["--extra_options", "algo_config=k_quant_mixed"]}
# rows whose GGUF slimlm exports itself, by the GGUF type they name
GGUF_ROWS = {"llama-cpp-q8_0": "q8_0", "llama-cpp-q4_k_m": "q4_k_m"}
ORT_BACKENDS = tuple(b for b in BACKENDS if b.startswith("ort-"))
DEFAULT_PPL = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# Prompt for the decode timing: short, so that decode speed is measured near the start of the cache.
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"


def main(argv=None) -> int:
    p = OneLineParser(prog="slimlm bench export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                   help="model to compare (repeatable); default dense=smollm2-135m")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ", ".join(BACKENDS))
    p.add_argument("--ppl", default=str(DEFAULT_PPL), help="text file for perplexity ('' to skip)")
    p.add_argument("--windows", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--prefill", type=positive_int, default=512)
    p.add_argument("--decode", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per row (median reported)")
    p.add_argument("--work", default=None, help="where artefacts are built (default: the slimlm cache)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    from slimlm.data import read_utf8
    from slimlm.errors import SlimlmError
    from slimlm.models import check_report, resolve

    pairs = [_split(m) for m in (args.model or ["dense=smollm2-135m"])]
    models = dict(pairs)
    if len(models) < len(pairs):
        raise SlimlmError("--model names must be unique")
    for spec in models.values():
        resolve(spec)  # a missing model is an error, not a table of skipped rows
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS and not _variant_ok(b)]
    if unknown:
        raise SlimlmError(f"unknown backends {unknown}: use {', '.join(BACKENDS)} (ONNX ones may end in +plain, "
                          "ort-int4 in +all4)")
    if args.ppl and not Path(args.ppl).is_file():
        raise SlimlmError(f"perplexity text not found: {args.ppl} (pass --ppl FILE or --ppl '')")
    if args.ppl:
        read_utf8(args.ppl, "perplexity file")
    if args.json:
        check_report(args.json)
    from slimlm.models import cache_dir

    work = Path(args.work or cache_dir() / "bench-export")
    rows = []
    for name, spec in models.items():
        for backend in backends:
            if backend == "llama-cpp" and not _llama_cpp_ok(spec):
                print(f"skip {name}/{backend}: llama-cpp-python not installed or {spec} has no GGUF", file=sys.stderr)
                continue
            if backend in GGUF_ROWS and not _llama_cpp_ok(None):
                print(f"skip {name}/{backend}: llama-cpp-python is not installed", file=sys.stderr)
                continue
            if backend in GENAI_ROWS and genai_python() is None:
                print(f"skip {name}/{backend}: onnxruntime-genai is not installed here and SLIMLM_GENAI_PYTHON is "
                      "not set", file=sys.stderr)
                continue
            print(f"prepare {name}/{backend} ...", file=sys.stderr, flush=True)
            try:
                artefact = prepare(spec, backend, work / name)
            except SlimlmError as exc:  # e.g. a failed ONNX validation: report the row, measure the others
                print(f"skip {name}/{backend}: {exc}", file=sys.stderr)
                continue
            rows.append({"model": name, "spec": spec, "backend": backend, "artefact": str(artefact), "runs": []})
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for row in rows:
            job = {"backend": row["backend"], "artefact": row["artefact"], "threads": args.threads,
                   "prefill": args.prefill, "decode": args.decode,
                   "ppl": args.ppl if r == 0 and args.ppl else None, "windows": args.windows, "seq_len": args.seq_len}
            print(f"run {r + 1}/{args.repeats} {row['model']}/{row['backend']} ...", file=sys.stderr, flush=True)
            row["runs"].append(_run_worker(job))
    results = [_summarise(row) for row in rows]
    _ratios(results)
    _print_table(results)
    out = {"bench": "export", "results": results, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
           "machine": _machine(args.threads), "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        from slimlm.models import write_file

        write_file(args.json, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


def _split(item: str) -> tuple[str, str]:
    from slimlm.errors import SlimlmError

    if "=" not in item:
        raise SlimlmError(f"--model takes NAME=SPEC, got {item!r}")
    name, spec = item.split("=", 1)
    return name, spec


def _llama_cpp_ok(spec: str | None) -> bool:
    """llama-cpp-python is installed and (for a `spec`) the model has a GGUF of its own."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    return spec is None or spec.endswith(".gguf") or _gguf_of(spec) is not None


def _gguf_of(spec: str):
    from slimlm.models import ALIASES, alias_gguf

    if spec.endswith(".gguf"):
        return spec
    return str(alias_gguf(spec)) if spec in ALIASES else None


# --------------------------------------------------------------------------------------------------
# Artefacts


def _hf_dir(spec: str) -> str:
    """A Hugging Face directory for `spec` (the alias's cache directory, or the directory itself)."""
    from slimlm.models import alias_dir, resolve

    kind, where = resolve(spec)
    return str(alias_dir(spec)) if kind == "alias" else str(where)


def prepare(spec: str, backend: str, work: Path) -> str:
    """Build (or reuse) what `backend` runs for model `spec`; return its path."""
    if backend == "torch-fp32":
        return _hf_dir(spec)
    if backend == "llama-cpp":
        return _gguf_of(spec)
    if backend in GGUF_ROWS:
        return _gguf_row(spec, GGUF_ROWS[backend], work / backend)
    if backend in GENAI_ROWS:
        return _genai_row(spec, backend, work / backend)
    base, _, variant = backend.partition("+")
    if variant in RUNTIME_VARIANTS:
        return prepare(spec, base, work)
    target = work / backend
    if (target / "slimlm.json").is_file() and _built_as_now(target, backend):
        return str(target)
    if backend.startswith("bnb-"):
        from slimlm.export.bnb import QuantConfig, quantize

        quantize(_hf_dir(spec), target, QuantConfig(method=backend[4:]), overwrite=True)
    else:
        from slimlm.export.onnx import export_onnx

        export_onnx(_hf_dir(spec), target, _onnx_config(backend), overwrite=True)
    return str(target)


def _gguf_row(spec: str, kind: str, target: Path) -> str:
    """`slimlm export gguf` of `spec` at type `kind` into target/model.gguf (reused while its record says the same
    source and type); validated by llama.cpp when it is installed, as the export always is."""
    from slimlm.export.gguf import GgufConfig, export_gguf

    out = target / "model.gguf"
    record = out.with_name(out.name + ".json")
    try:
        done = json.loads(record.read_text())["gguf"]["config"]["type"] == kind and out.is_file()
    except (OSError, ValueError, KeyError, TypeError):
        done = False
    if not done:
        export_gguf(_hf_dir(spec), out, GgufConfig(type=kind, modelfile=False), overwrite=True)
    return str(out)


def genai_python() -> str | None:
    """A Python that imports onnxruntime_genai: SLIMLM_GENAI_PYTHON when it names one, else this one if it can."""
    import importlib.util

    named = os.environ.get("SLIMLM_GENAI_PYTHON")
    if named:
        return named if Path(named).is_file() else None
    return sys.executable if importlib.util.find_spec("onnxruntime_genai") is not None else None


def _genai_row(spec: str, backend: str, target: Path) -> str:
    """onnxruntime-genai's model builder on the model directory of `spec` into `target` (reused while its record
    says the same source and options). The builder is the peer's own tool: its failure skips the row."""
    import shutil

    from slimlm.errors import SlimlmError

    source = _hf_dir(spec)
    argv = ["-i", source, "-p", "int4", "-e", "cpu", *GENAI_ROWS[backend]]
    record = target / "slimlm-genai.json"
    try:
        if json.loads(record.read_text())["argv"] == argv and (target / "model.onnx").is_file():
            return str(target)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [genai_python(), "-m", "onnxruntime_genai.models.builder", *argv, "-o", str(tmp),
           "-c", str(target.parent / "genai-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    if proc.returncode != 0 or not (tmp / "model.onnx").is_file():
        lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimlmError(f"onnxruntime-genai's builder failed on {source}: {(lines or ['no output'])[-1]}")
    (tmp / record.name).write_text(json.dumps({"argv": argv}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return str(target)


# minutes of quantization-aware training of the "+qat" row (`slimlm export onnx --qat-minutes`)
QAT_MINUTES = 5.0
# Row variants of the ONNX backends: the export settings they change from today's defaults.
VARIANTS = {"plain": ({"attention": "plain"}, ORT_BACKENDS), "all4": ({"int4_keep8": ()}, ("ort-int4",)),
            "stepped": ({}, ORT_BACKENDS), "mixed": ({"int4_keep8_layers": "mixed"}, ("ort-int4",)),
            "qat": ({"qat_minutes": QAT_MINUTES}, ("ort-int4",))}
# variants that change how an export runs, not the export: they run their base row's artefact
RUNTIME_VARIANTS = ("stepped",)


def _variant_ok(backend: str) -> bool:
    base, plus, variant = backend.partition("+")
    return bool(plus) and variant in VARIANTS and base in VARIANTS[variant][1]


def _onnx_config(backend: str):
    """The export settings of an ONNX backend row: today's defaults, changed as its variant says ("+plain")."""
    from slimlm.export.onnx import OnnxConfig

    base, _, variant = backend.partition("+")
    return OnnxConfig(weights=base[4:], **(VARIANTS[variant][0] if variant else {}))


def _built_as_now(target: Path, backend: str) -> bool:
    """A cached ONNX artefact was exported with today's default settings (an export default that changed since,
    e.g. the int4 method, rebuilds it); bitsandbytes copies are reused as they are."""
    if not backend.startswith("ort-"):
        return True
    from slimlm.export.onnx import exported_with

    return exported_with(target, _onnx_config(backend))


# --------------------------------------------------------------------------------------------------
# The worker: one backend, one process


def _run_worker(job: dict) -> dict:
    cmd = [sys.executable, "-m", "slimlm.export.bench", "--worker", json.dumps(job)]
    if job.get("backend") in GENAI_ROWS:
        cmd = [genai_python(), "-c", GENAI_WORKER, json.dumps({**job, **_genai_ids(job)})]
    # PYTHONSAFEPATH: the working directory stays off sys.path (in a checkout, its kernels/ hides a package
    # transformers imports)
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode < 0:  # killed by a signal: a crash in native code (or the OOM killer) leaves no message
        import signal

        return {"error": f"the worker died of {signal.Signals(-proc.returncode).name}"}
    if proc.returncode != 0:
        bar = re.compile(r"\d+%\|")  # progress bars are not the error
        lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip() and not bar.search(line)]
        return {"error": (lines or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(job: dict) -> dict:
    import resource
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    backend = job["backend"]
    runner = _load(backend, job["artefact"], job["threads"])
    out = {}
    if job.get("ppl"):
        out["ppl"] = _perplexity(runner, job["ppl"], job["windows"], job["seq_len"])
    prompt = runner.tokenizer(DECODE_PROMPT, add_special_tokens=False)["input_ids"]
    prefill_ids = _prefill_ids(runner, job["prefill"])
    runner.prefill(prefill_ids[:16])  # warm-up (excluded)
    runner.decode(prompt, 4)
    t = time.perf_counter()
    runner.prefill(prefill_ids)
    out["prefill_tok_s"] = len(prefill_ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    n = runner.decode(prompt, job["decode"])
    out["decode_tok_s"] = n / (time.perf_counter() - t)
    out["peak_rss_mb"] = _peak_rss_mb(resource)
    return out


_IDS: dict = {}


def _genai_ids(job: dict) -> dict:
    """The token ids a genai worker runs (its Python need not have transformers): the prompts and perplexity
    windows the other rows make with the same tokenizer (the builder copies it beside the graph)."""
    key = (job["artefact"], job["prefill"], job["ppl"], job["windows"], job["seq_len"])
    if key not in _IDS:
        from transformers import AutoTokenizer

        from slimlm.data import read_text, token_windows

        class Runner:
            tokenizer = AutoTokenizer.from_pretrained(job["artefact"])

        ids = {"prompt_ids": Runner.tokenizer(DECODE_PROMPT, add_special_tokens=False)["input_ids"],
               "prefill_ids": _prefill_ids(Runner, job["prefill"])}
        if job.get("ppl"):
            ids["ppl_ids"] = token_windows(Runner.tokenizer, read_text(job["ppl"]), job["windows"], job["seq_len"],
                                           what=job["ppl"]).tolist()
        _IDS[key] = ids
    return _IDS[key]


# A genai row's worker, run by a Python with onnxruntime-genai (and numpy): the same measurements as `_worker`.
GENAI_WORKER = r"""
import json, math, sys, time
import numpy as np
import onnxruntime_genai as og

job = json.loads(sys.argv[1])
config = og.Config(job["artefact"])
threads = {"model": {"decoder": {"session_options": {"intra_op_num_threads": job["threads"]}}}}
config.overlay(json.dumps(threads))
model = og.Model(config)


def generator(n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n, min_length=n, do_sample=False)
    return og.Generator(model, params)


out = {}
if job.get("ppl_ids"):
    nll, count = 0.0, 0
    for row in job["ppl_ids"]:
        gen = generator(len(row) + 1)
        gen.append_tokens(row)
        logits = gen.get_output("logits")[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    out["ppl"] = math.exp(nll / count)


def decode(prompt, n):
    gen = generator(len(prompt) + n)
    gen.append_tokens(prompt)
    for _ in range(n):
        gen.generate_next_token()
    return n


prompt, prefill = job["prompt_ids"], job["prefill_ids"]
generator(32).append_tokens(prefill[:16])  # warm-up (excluded)
decode(prompt, 4)
t = time.perf_counter()
generator(len(prefill) + 1).append_tokens(prefill)
out["prefill_tok_s"] = len(prefill) / (time.perf_counter() - t)
t = time.perf_counter()
n = decode(prompt, job["decode"])
out["decode_tok_s"] = n / (time.perf_counter() - t)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        out["peak_rss_mb"] = int(line.split()[1]) / 1024
print(json.dumps(out))
"""


def _peak_rss_mb(resource) -> float:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss does not on Linux (a worker would
    report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _prefill_ids(runner, n: int) -> list[int]:
    sentence = "The history of the region is long and varied, shaped by trade, war and migration."
    text = " ".join([sentence] * (n // 8 + 8))
    return runner.tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def _perplexity(runner, path: str, windows: int, seq_len: int) -> float:
    import math

    import torch

    from slimlm.data import read_text, token_windows

    ids = token_windows(runner.tokenizer, read_text(path), windows, seq_len, what=path)
    nll, count = 0.0, 0
    for row in ids:
        logits = runner.logits(row.tolist()).float()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp.gather(-1, row[1:, None]).sum())
        count += row.numel() - 1
    return math.exp(nll / count)


class _Torch:
    def __init__(self, path: str, threads: int):
        import slimlm

        self.model, self.tokenizer = slimlm.load_model(path)

    def logits(self, ids):
        import torch

        from slimlm.export.bnb import quiet_bnb

        with torch.no_grad(), quiet_bnb():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]

    def prefill(self, ids):
        import torch

        from slimlm.export.bnb import quiet_bnb

        with torch.no_grad(), quiet_bnb():
            self.model(input_ids=torch.tensor([ids]), use_cache=True)

    def decode(self, prompt, n: int) -> int:
        import torch

        from slimlm.export.bnb import quiet_bnb

        with torch.no_grad(), quiet_bnb():
            ids = torch.tensor([prompt])
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return out.shape[1] - len(prompt)


class _Ort:
    def __init__(self, path: str, threads: int, share_buffer: bool = True):
        from slimlm.export.runtime import OnnxCausalLM

        self.share_buffer = share_buffer
        self.lm = OnnxCausalLM(path, threads=threads)
        self.tokenizer = self.lm.tokenizer

    def logits(self, ids):
        import numpy as np

        n = len(ids)
        return self.lm.step(np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], None)[0][0]

    def prefill(self, ids):
        self.logits(ids)

    def decode(self, prompt, n: int) -> int:
        return len(self.lm.generate(prompt, n, stop_at_eos=False, share_buffer=self.share_buffer))


class _LlamaCpp:
    def __init__(self, path: str, threads: int):
        import llama_cpp

        from slimlm.models import load_model

        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                                   n_batch=512, logits_all=True, verbose=False)
        self.tokenizer = load_model(path)[1]  # the same tokenizer, so perplexity windows are identical

    def logits(self, ids):
        import torch

        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, prompt, n: int) -> int:
        self.llm.reset()
        self.llm.eval(prompt)
        for _ in range(n):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            self.llm.eval([token])
        return n


def _load(backend: str, path: str, threads: int):
    if backend.startswith("ort-"):
        return _Ort(path, threads, share_buffer=not backend.endswith("+stepped"))
    if backend.startswith("llama-cpp"):
        return _LlamaCpp(path, threads)
    return _Torch(path, threads)


# --------------------------------------------------------------------------------------------------
# Reporting


def _disk_bytes(path: str) -> int:
    from slimlm.files import dir_bytes

    p = Path(path)
    return p.stat().st_size if p.is_file() else dir_bytes(p)


def _summarise(row: dict) -> dict:
    ok = [r for r in row["runs"] if "error" not in r]
    errors = [r["error"] for r in row["runs"] if "error" in r]
    res = {"model": row["model"], "backend": row["backend"], "disk_mb": _disk_bytes(row["artefact"]) / 1e6,
           "runs": len(ok), "errors": errors}
    if ok:
        for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
            res[key] = statistics.median(r[key] for r in ok)
        res["decode_tok_s_all"] = [round(r["decode_tok_s"], 2) for r in ok]
        res["ppl"] = next((r["ppl"] for r in ok if "ppl" in r), None)
    return res


def _ratios(results: list[dict]) -> None:
    """Decode speed against the first model's torch-fp32 row; perplexity against the same model's torch-fp32."""
    base = next((r for r in results if r["backend"] == "torch-fp32" and r.get("decode_tok_s")), None)
    for r in results:
        if base and r.get("decode_tok_s"):
            r["decode_vs_dense_torch"] = r["decode_tok_s"] / base["decode_tok_s"]
        own = next((x for x in results if x["model"] == r["model"] and x["backend"] == "torch-fp32"), None)
        if own and own.get("ppl") and r.get("ppl"):
            r["ppl_vs_own_fp32"] = r["ppl"] / own["ppl"] - 1
        cpp = next((x for x in results if x["backend"] == "llama-cpp" and x.get("decode_tok_s")), None)
        if cpp and r.get("decode_tok_s"):
            r["decode_vs_llama_cpp"] = r["decode_tok_s"] / cpp["decode_tok_s"]
            # the rows of one round ran back to back: the ratio within each round cancels slow drifts of the machine
            rounds = _per_round(r, cpp)
            if rounds:
                r["decode_vs_llama_cpp_rounds"] = [round(x, 3) for x in rounds]
                r["decode_vs_llama_cpp_round_median"] = statistics.median(rounds)
        # against onnxruntime-genai's k_quant_mixed graph of the same model (its own runtime), round by round
        peer = next((x for x in results if x["model"] == r["model"] and x["backend"] == "genai-int4-mixed"
                     and x.get("decode_tok_s")), None)
        rounds = _per_round(r, peer) if peer and r.get("decode_tok_s") else None
        if rounds:
            r["decode_vs_genai_mixed_rounds"] = [round(x, 3) for x in rounds]
            r["decode_vs_genai_mixed"] = statistics.median(rounds)


def _per_round(row: dict, other: dict) -> list[float] | None:
    """Decode tok/s of `row` over `other`'s, round by round (None when they ran a different number of rounds)."""
    if len(row["decode_tok_s_all"]) != len(other["decode_tok_s_all"]):
        return None
    return [a / b for a, b in zip(row["decode_tok_s_all"], other["decode_tok_s_all"])]


def _print_table(results: list[dict]) -> None:
    head = f"{'model':<12} {'backend':<14} {'disk MB':>8} {'RSS MB':>7} {'ppl':>8} {'dppl':>7} {'prefill/s':>9} " \
           f"{'decode/s':>8} {'x dense':>7} {'x llama':>7} {'x genai':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        if not r["runs"]:
            print(f"{r['model']:<12} {r['backend']:<14} error: {r['errors'][:1]}")
            continue
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") else "-"
        dppl = f"{100 * r['ppl_vs_own_fp32']:+.1f}%" if "ppl_vs_own_fp32" in r else "-"
        cpp = f"{r['decode_vs_llama_cpp']:.2f}" if "decode_vs_llama_cpp" in r else "-"
        dense = f"{r['decode_vs_dense_torch']:.2f}" if "decode_vs_dense_torch" in r else "-"
        genai = f"{r['decode_vs_genai_mixed']:.2f}" if "decode_vs_genai_mixed" in r else "-"
        print(f"{r['model']:<12} {r['backend']:<14} {r['disk_mb']:>8.1f} {r['peak_rss_mb']:>7.0f} {ppl:>8} {dppl:>7} "
              f"{r['prefill_tok_s']:>9.1f} {r['decode_tok_s']:>8.1f} "
              f"{dense:>7} {cpp:>7} {genai:>7}")


def _machine(threads: int) -> dict:
    from slimlm.env import library_versions, machine

    info = {**machine(), "threads": threads,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    info.update(library_versions("torch", "transformers", "onnxruntime", "onnx", "bitsandbytes", "llama_cpp"))
    py = genai_python()
    if py:  # the peer's own onnxruntime, which may differ from ours
        probe = ("import json, onnxruntime, onnxruntime_genai as g; "
                 "print(json.dumps([g.__version__, onnxruntime.__version__]))")
        proc = subprocess.run([py, "-c", probe], capture_output=True, text=True)
        if proc.returncode == 0:
            info["onnxruntime_genai"], info["onnxruntime_of_genai"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return info


if __name__ == "__main__":
    sys.exit(main())
