"""Benchmark of the fused FFN kernels (`slimlm bench kernel`, `benchmarks/bench_ffn.py`).

On a CUDA device it times three implementations of y = x + W_down(silu(W_gate n) * (W_up n)), n = rmsnorm(x) * g,
side by side: the Triton kernels, the eager PyTorch reference, and `torch.compile` of the reference, over decode
(M = 1, 16) and prefill (M = 512, 4096) rows for the SmolLM2-135M FFN (576, 1536) and a 7B-class one
(4096, 11008). Each round times every implementation in turn (calls_per_round back-to-back calls between two
CUDA events, after a synchronise), after a warm-up that is not timed (it also runs the autotuner and the
compiler); reported times are medians over rounds. Calls cycle through enough weight copies to miss L2, so
small FFNs are timed from HBM as in a real model. It prints a table, then one JSON object as the last line.

Traffic and work per call: bytes = the three weight matrices + the norm weight + x read + y written (the least
any implementation must move); flops = 2 * M * H * I * 3. Fraction of peak divides achieved GB/s and TFLOP/s by
the device's datasheet peaks (DEVICE_PEAKS, or --peak-gbs / --peak-tflops).

Without a CUDA device it says so and exits 0 without numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch

from slimlm.cli import OneLineParser
from slimlm.env import library_versions, machine
from slimlm.errors import SlimlmError

# Datasheet peaks (dense, no sparsity) as (memory GB/s, 16-bit tensor TFLOP/s), matched against
# torch.cuda.get_device_name() in order. Sources: NVIDIA H200, H100 (SXM5 / PCIe / NVL), A100 (40/80 GB SXM and
# PCIe), L40S, L4, A10 datasheets.
DEVICE_PEAKS = [
    ("H200", 4800.0, 989.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("L40S", 864.0, 362.0),
    ("L4", 300.0, 121.0),
    ("A10", 600.0, 125.0),
]

IMPLS = ("triton", "eager", "compile")


@dataclass
class KernelBenchConfig:
    """What `slimlm bench kernel` measures."""

    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(576, 1536), (4096, 11008)])
    """(hidden, intermediate) pairs."""
    rows: list[int] = field(default_factory=lambda: [1, 16, 512, 4096])
    """Token rows M per call: <= 16 is decode, the rest prefill."""
    dtype: str = "bfloat16"
    """Activation and weight dtype: bfloat16, float16 or float32."""
    warmup: int = 10
    """Untimed calls per implementation before timing."""
    rounds: int = 30
    """Timed rounds; each times every implementation in turn."""
    calls_per_round: int = 10
    """Back-to-back calls per timing (CUDA events around them, ms per call), cycling through weight copies."""
    compile: bool = True
    """Also time torch.compile of the reference."""
    peak_gbs: float | None = None
    """Override the device's peak memory bandwidth (GB/s)."""
    peak_tflops: float | None = None
    """Override the device's peak 16-bit tensor throughput (TFLOP/s)."""

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not self.shapes or any(h <= 0 or i <= 0 for h, i in self.shapes):
            raise ValueError(f"shapes must be positive (hidden, intermediate) pairs, got {self.shapes}")
        if not self.rows or any(m <= 0 for m in self.rows):
            raise ValueError(f"rows must be positive, got {self.rows}")
        if self.warmup < 1 or self.rounds < 1 or self.calls_per_round < 1:
            raise ValueError("warmup, rounds and calls_per_round must be >= 1")


def device_peaks(name: str) -> tuple[float | None, float | None]:
    for key, gbs, tflops in DEVICE_PEAKS:
        if key in name:
            return gbs, tflops
    return None, None


def _time_round(fn, argsets: list, calls: int, start: int) -> float:
    """`calls` back-to-back calls (cycling through argsets from `start`) timed with CUDA events; ms per call."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for j in range(calls):
        fn(*argsets[(start + j) % len(argsets)])
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / calls


def _weight_copies(hidden: int, inter: int, elem: int, dev) -> int:
    """Weight copies to cycle through so that consecutive calls miss L2 (twice its size in weights, at most 64):
    otherwise a small FFN's weights stay in L2 and the 'memory' bandwidth exceeds what HBM can give."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    return max(1, min(64, -(-2 * l2 // (3 * hidden * inter * elem))))


def run_bench(cfg: KernelBenchConfig) -> dict:
    """Measure every (shape, rows, implementation); returns the JSON-ready result."""
    from slimlm.kernels.ffn import fused_ffn, fused_ffn_reference

    dtype = getattr(torch, cfg.dtype)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak_gbs, peak_tflops = device_peaks(name)
    peak_gbs = cfg.peak_gbs or peak_gbs
    peak_tflops = cfg.peak_tflops or peak_tflops

    def triton_fn(*a):
        return fused_ffn(*a, impl="triton")

    results = []
    with torch.inference_mode():
        for hidden, inter in cfg.shapes:
            gen = torch.Generator(device=dev).manual_seed(0)
            elem = torch.empty((), dtype=dtype).element_size()
            weights = []
            for _ in range(_weight_copies(hidden, inter, elem, dev)):
                g = (1 + 0.1 * torch.randn(hidden, device=dev, generator=gen)).to(dtype)
                wg = (torch.randn(inter, hidden, device=dev, generator=gen) / hidden**0.5).to(dtype)
                wu = (torch.randn(inter, hidden, device=dev, generator=gen) / hidden**0.5).to(dtype)
                wd = (torch.randn(hidden, inter, device=dev, generator=gen) / inter**0.5).to(dtype)
                weights.append((g, wg, wu, wd))
            for m in cfg.rows:
                x = torch.randn(m, hidden, device=dev, generator=gen).to(dtype)
                argsets = [(x, *w, 1e-6) for w in weights]
                impls = {"triton": triton_fn, "eager": fused_ffn_reference}
                if cfg.compile:  # a fresh compile per case: one static shape each, no recompile limit reached
                    torch._dynamo.reset()
                    impls["compile"] = torch.compile(fused_ffn_reference, dynamic=False)
                nbytes = (3 * hidden * inter + hidden + 2 * m * hidden) * elem
                flops = 2.0 * m * hidden * inter * 3
                times: dict[str, list[float]] = {k: [] for k in impls}
                peak_mem = {}
                for k, fn in impls.items():
                    torch.cuda.reset_peak_memory_stats(dev)
                    for j in range(cfg.warmup):
                        fn(*argsets[j % len(argsets)])
                    torch.cuda.synchronize()
                    peak_mem[k] = torch.cuda.max_memory_allocated(dev) / 2**20
                for r in range(cfg.rounds):
                    for k, fn in impls.items():
                        times[k].append(_time_round(fn, argsets, cfg.calls_per_round, r * cfg.calls_per_round))
                ref = fused_ffn_reference(*[a.float() if torch.is_tensor(a) else a for a in argsets[0]])
                err = (triton_fn(*argsets[0]).float() - ref).abs().max().item()
                for k in impls:
                    ms = statistics.median(times[k])
                    gbs = nbytes / ms / 1e6
                    tflops = flops / ms / 1e9
                    results.append({
                        "hidden": hidden, "intermediate": inter, "rows": m, "phase": "decode" if m <= 16 else "prefill",
                        "impl": k, "ms": ms, "gb_s": gbs, "tflop_s": tflops,
                        "frac_peak_bw": gbs / peak_gbs if peak_gbs else None,
                        "frac_peak_flops": tflops / peak_tflops if peak_tflops else None,
                        "speedup_vs_eager": statistics.median(times["eager"]) / ms,
                        "speedup_vs_compile": statistics.median(times["compile"]) / ms if "compile" in times else None,
                        "peak_mem_mib": peak_mem[k],
                        "max_abs_err_vs_fp32": err if k == "triton" else None,
                    })
    return {
        "device": name, "peak_gb_s": peak_gbs, "peak_tflop_s": peak_tflops, **library_versions("torch", "triton"),
        "cuda": torch.version.cuda, "python": machine()["python"],
        "config": asdict(cfg), "results": results,
    }


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(res: dict) -> None:
    print(f"device: {res['device']}  (peaks: {_fmt(res['peak_gb_s'], '.0f')} GB/s, "
          f"{_fmt(res['peak_tflop_s'], '.0f')} TFLOP/s)  torch {res['torch']}  triton {res['triton']}")
    head = (f"{'H':>5} {'I':>6} {'M':>5} {'phase':>7} {'impl':>8} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} "
            f"{'%bw':>6} {'%flops':>6} {'x eager':>8} {'x compile':>9}")
    print(head)
    print("-" * len(head))
    for r in res["results"]:
        pbw = None if r["frac_peak_bw"] is None else 100 * r["frac_peak_bw"]
        pfl = None if r["frac_peak_flops"] is None else 100 * r["frac_peak_flops"]
        print(f"{r['hidden']:>5} {r['intermediate']:>6} {r['rows']:>5} {r['phase']:>7} {r['impl']:>8} "
              f"{r['ms']:>9.4f} {r['gb_s']:>8.1f} {r['tflop_s']:>8.2f} {_fmt(pbw, '.1f'):>6} {_fmt(pfl, '.1f'):>6} "
              f"{r['speedup_vs_eager']:>8.2f} {_fmt(r['speedup_vs_compile'], '.2f'):>9}")


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in p.lower().split("x")) for p in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected HIDDENxINTERMEDIATE pairs such as 576x1536, got {text!r}")
    return pairs


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="slimlm bench kernel", description=__doc__.split("\n\n")[0])
    d = KernelBenchConfig()
    p.add_argument("--shapes", type=_pairs, default=d.shapes,
                   help="HIDDENxINTERMEDIATE pairs, comma separated (default 576x1536,4096x11008)")
    p.add_argument("--rows", type=_ints, default=d.rows,
                   help="rows M per call, comma separated (default 1,16,512,4096)")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--calls-per-round", type=int, default=d.calls_per_round)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the reference")
    p.add_argument("--peak-gbs", type=float, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    try:
        cfg = KernelBenchConfig(**vars(args))
    except ValueError as exc:
        raise SlimlmError(str(exc)) from None
    if not torch.cuda.is_available():
        print("no CUDA device is present: the kernel benchmark needs one, nothing was measured")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("the kernel benchmark needs triton: pip install 'slimlm[triton]'", file=sys.stderr)
        return 1
    res = run_bench(cfg)
    print_table(res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
