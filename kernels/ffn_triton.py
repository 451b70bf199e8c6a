"""Triton kernels and launcher for the replacement FFN: y = x + W_down(silu(W_gate n) * (W_up n)), n = rmsnorm(x) * g.

This module imports triton at the top, so only `slimlm.kernels.ffn` imports it, and only on the Triton path
(`import slimlm` must not load triton, and triton is an optional dependency). The spec is
`slimlm.kernels.ffn.fused_ffn_reference`; everything here must agree with it.

Two kernels, two launches per call:

1. `_gate_up_kernel` (M, H) -> (M, I): a prologue pass over the tile's rows computes the RMSNorm statistic,
   then one pass over K normalises each loaded x tile (fp32 math, rounded to the input dtype the way the
   reference rounds `n`, times the norm weight) and feeds it to two dots that share it, gate and up. The
   epilogue applies silu(gate) * up in fp32 and writes the intermediate once, in the input dtype.
2. `_down_kernel` (M, I) -> (M, H): the down projection with the residual add in its epilogue. For decode
   (M <= DECODE_MAX_M) the K dimension is split over SPLIT_K programs so that enough SMs stream the weight;
   each writes an fp32 partial, and the last program to finish a tile (an atomic counter per tile) sums the
   partials in a fixed order, adds the residual and stores the output. So decode is still two launches and
   the result does not depend on which program finished last.

Tile sizes come from `triton.autotune` over the short config lists below, one list for prefill and one for
decode; the tuning key is (M bucket, N, K, dtypes), so a new prompt length does not re-tune.

dtypes: fp32, fp16 and bf16, accumulation in fp32; loads are converted to fp32 before any elementwise math
(dot operands stay in the input dtype, for the tensor cores). Under
TRITON_INTERPRET=1 the interpreter computes bf16 arithmetic on raw bits and truncates fp32 -> bf16, so the
kernels take an INTERPRETED flag: dot operands are upcast to fp32 (exact, they hold dtype values) and the
fp32 -> bf16 rounding is done by hand, round-to-nearest-even as on the GPU. The compiled GPU code never
takes those branches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# True when triton.jit builds interpreted functions (TRITON_INTERPRET=1 before triton was imported).
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Rows up to which a call counts as decode and uses the weight-streaming configs (BLOCK_M = 16, the smallest
# tile tl.dot takes; decode reads each weight once, so the padding rows cost no memory traffic).
DECODE_MAX_M = 16

# Supported activation / weight dtypes.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, split_k: int | None = None, group_m: int = 8):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if split_k is not None:
        kw["SPLIT_K"] = split_k
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Autotune lists. Shared memory per config is about stages * (BM*BK + n_b*BN*BK) * bytes, n_b = 2 for gate/up
# (two weight tiles per step) and 1 for down; every 16-bit config stays under the A100's 164 KiB, and
# `tests/kernels/test_compile.py` checks what the compiler actually allocates for sm_80 and sm_90.
# fp32 inputs are the exactness path (FMA dots unless torch allows TF32), not the fast one: they use only the
# last, smallest config of each list, with its stages lowered until the estimate fits (`prune_for_dtype`).
#
# Prefill, gate/up: the usual Triton matmul shapes for A100/H100, 128-wide tiles for large M, 64-wide for
# few row tiles (M of a few hundred) so that more programs are in flight.
GATE_UP_PREFILL_CONFIGS = [
    _cfg(128, 128, 64, warps=8, stages=3),
    _cfg(128, 64, 64, warps=4, stages=4),
    _cfg(64, 128, 64, warps=4, stages=4),
    _cfg(64, 64, 64, warps=4, stages=4),
]
# Decode, gate/up: one row tile; narrow N tiles (I / BN programs) and long K steps with deep pipelining, so
# each SM keeps several weight loads in flight (decode is bound by reading W_gate and W_up once).
GATE_UP_DECODE_CONFIGS = [
    _cfg(16, 32, 128, warps=4, stages=4),
    _cfg(16, 64, 128, warps=4, stages=4),
    _cfg(16, 16, 256, warps=4, stages=4),
]
# Prefill, down: SPLIT_K = 1 (enough output tiles), residual add in the epilogue.
DOWN_PREFILL_CONFIGS = [
    _cfg(128, 128, 64, warps=8, stages=3, split_k=1),
    _cfg(128, 64, 64, warps=4, stages=4, split_k=1),
    _cfg(64, 128, 64, warps=4, stages=4, split_k=1),
    _cfg(64, 64, 64, warps=4, stages=4, split_k=1),
]
# Decode, down: N = hidden is small (576 -> 18 tiles of 32), so split K to reach ~100+ programs on 108-132 SMs.
DOWN_DECODE_CONFIGS = [
    _cfg(16, 32, 128, warps=4, stages=4, split_k=1),
    _cfg(16, 32, 128, warps=4, stages=4, split_k=4),
    _cfg(16, 64, 128, warps=4, stages=4, split_k=4),
    _cfg(16, 32, 128, warps=4, stages=4, split_k=8),
]
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in DOWN_DECODE_CONFIGS + DOWN_PREFILL_CONFIGS)

# Budget for `prune_for_dtype`'s shared-memory estimate: the A100's 164 KiB per block, less room for the epilogue's
# layout conversions and barriers. Measured allocations are in the compile test.
SMEM_BUDGET = 160 * 1024


def smem_estimate(config: triton.Config, elem_bytes: int, weight_tiles: int) -> int:
    """Pipelined operand bytes for one config: stages * (x tile + weight tiles)."""
    k = config.kwargs
    per_stage = k["BLOCK_M"] * k["BLOCK_K"] + weight_tiles * k["BLOCK_N"] * k["BLOCK_K"]
    return config.num_stages * per_stage * elem_bytes


def prune_for_dtype(configs, elem_bytes: int, weight_tiles: int) -> list:
    """The configs a dtype runs: all of them for 16-bit inputs; for fp32 the last (smallest) one, with
    num_stages lowered (to 2 at least) until its estimate fits SMEM_BUDGET. Used by the autotuners and by
    the compile test."""
    if elem_bytes <= 2:
        return list(configs)
    c = configs[-1]
    stages = c.num_stages
    while stages > 2 and smem_estimate(triton.Config(c.kwargs, num_stages=stages), elem_bytes, weight_tiles) > (
        SMEM_BUDGET
    ):
        stages -= 1
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]


def _prune_gate_up(configs, named_args, **kwargs):
    return prune_for_dtype(configs, named_args["x_ptr"].element_size(), weight_tiles=2)


def _prune_down(configs, named_args, **kwargs):
    return prune_for_dtype(configs, named_args["a_ptr"].element_size(), weight_tiles=1)


# ------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _round(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. The interpreter truncates fp32 -> bf16, so round by hand there."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time so weight tiles are reused from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# M (and its bucket) are not specialised: decode calls with M = 1 and M = 7 share one binary.
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gate_up_kernel(
    x_ptr,  # (M, K) activations, contiguous
    g_ptr,  # (K,) RMSNorm weight
    wg_ptr,  # (N, K) gate weight, nn.Linear layout
    wu_ptr,  # (N, K) up weight
    a_ptr,  # (M, N) out: silu(gate) * up, input dtype
    M,
    N,
    K,
    eps,
    M_BUCKET,  # autotune key only: next power of two of M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INTERPRETED: tl.constexpr,
    FP32_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 inputs, following torch's matmul precision
):
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K  # (BM, 1)
    wg_cols = wg_ptr + rn.to(tl.int64)[None, :] * K  # (1, BN)
    wu_cols = wu_ptr + rn.to(tl.int64)[None, :] * K

    # RMSNorm statistic of this tile's rows, in fp32 (the rows are re-read from L2 by the main loop).
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
        sumsq += tl.sum(xt * xt, axis=1)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(sumsq / K + eps))  # (BM,); IEEE sqrt and division, not the approximations

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        gt = tl.load(g_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        # n = g * (x * rstd).to(dtype), rounded to dtype: the reference's roundings, step by step.
        n = _round(xt * rstd[:, None], DTYPE, INTERPRETED).to(tl.float32) * gt[None, :]
        n = _round(n, DTYPE, INTERPRETED)  # (BM, BK)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(wg_cols + kk[:, None], mask=w_mask, other=0.0)  # (BK, BN)
        wu = tl.load(wu_cols + kk[:, None], mask=w_mask, other=0.0)
        if INTERPRETED:
            n = n.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g = tl.dot(n, wg, acc_g, input_precision=FP32_PRECISION)
        acc_u = tl.dot(n, wu, acc_u, input_precision=FP32_PRECISION)

    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    a_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(a_ptr + a_offs, _round(act, DTYPE, INTERPRETED), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _down_kernel(
    a_ptr,  # (M, K) intermediate, contiguous
    w_ptr,  # (N, K) down weight, nn.Linear layout
    x_ptr,  # (M, N) residual
    out_ptr,  # (M, N) out = x + a @ w.T
    ws_ptr,  # (SPLIT_K, M, N) fp32 partials (unused when SPLIT_K == 1)
    count_ptr,  # (>= tiles,) int32 arrival counters, zero between calls (unused when SPLIT_K == 1)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * K
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K

    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_span
        k_hi = tl.minimum(k_lo + k_span, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < k_hi
        at = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        wt = tl.load(w_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # (BK, BN)
        if INTERPRETED:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=FP32_PRECISION)

    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        res = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _round(acc + res, DTYPE, INTERPRETED), mask=mask)
    else:
        plane = M.to(tl.int64) * N
        tl.store(ws_ptr + pid_k * plane + offs, acc, mask=mask)
        # Every thread's partial is stored before the one release below (CTA barrier, then a release atomic).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program for this tile: reduce in split order, add the residual
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
            res = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, _round(total + res, DTYPE, INTERPRETED), mask=mask)
            tl.atomic_xchg(count_ptr + pid, 0)  # ready for the next call


_KEY = ["M_BUCKET", "N", "K"]
_gate_up_prefill = triton.autotune(GATE_UP_PREFILL_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune_gate_up})(_gate_up_kernel)
_gate_up_decode = triton.autotune(GATE_UP_DECODE_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune_gate_up})(_gate_up_kernel)
_down_prefill = triton.autotune(DOWN_PREFILL_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune_down})(_down_kernel)
_down_decode = triton.autotune(DOWN_DECODE_CONFIGS, key=_KEY, prune_configs_by={
    "early_config_prune": _prune_down})(_down_kernel)


# ------------------------------------------------------------------------------------------------------------
# Launcher

_BUFFERS: dict[tuple, torch.Tensor] = {}  # per-device buffers the launcher keeps between calls


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 arrival counters for split-K tiles, one buffer per (device, stream) so that calls on two streams
    never share one; every call leaves them at zero again."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf


def _scratch(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor standing in for the split-K workspace when there is no split."""
    key = (device, "scratch")
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _BUFFERS[key]


def _fp32_precision() -> str:
    """tf32 dots for fp32 inputs only when torch's matmuls may use them too, so both paths agree."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _bucket(m: int) -> int:
    return triton.next_power_of_2(m)


def _launch(tuner, grid_fn, args, meta, config):
    """Run `tuner` (an Autotuner), or its kernel with one config: `config` when given, and under the
    interpreter the first config the dtype runs (the interpreter would otherwise time every config)."""
    if config is None and not INTERPRETED:
        tuner[grid_fn](*args, **meta)
        return tuner.best_config
    if config is None:
        config = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, args)))[0]
    kw = dict(config.kwargs)
    tuner.fn[grid_fn(kw)](*args, **meta, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return config


def fused_ffn_triton(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
    gate_up_config: triton.Config | None = None,
    down_config: triton.Config | None = None,
) -> torch.Tensor:
    """The fused FFN on the Triton kernels. x: (..., H); weights in nn.Linear layout; all one dtype.

    `gate_up_config` / `down_config` bypass autotuning (tests use them to run every path); without them
    the prefill or decode autotuner picks by M."""
    hidden = x.shape[-1]
    inter = gate_weight.shape[0]
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton FFN takes {', '.join(map(str, DTYPES))} inputs, got {x.dtype}")
    for name, t, shape in (("norm_weight", norm_weight, (hidden,)), ("gate_weight", gate_weight, (inter, hidden)),
                           ("up_weight", up_weight, (inter, hidden)), ("down_weight", down_weight, (hidden, inter))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}: cast them together")
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError("the Triton FFN needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing triton)")

    x2 = x.reshape(-1, hidden).contiguous()  # (M, H)
    m = x2.shape[0]
    out = torch.empty_like(x2)
    if m == 0:
        return out.reshape(x.shape)
    a = torch.empty((m, inter), dtype=x.dtype, device=x.device)  # (M, I), written once
    decode = m <= DECODE_MAX_M
    # enable_fp_fusion: FMA contraction, stated so that triton does not warn about its changing default.
    common = {"INTERPRETED": INTERPRETED, "FP32_PRECISION": _fp32_precision(), "enable_fp_fusion": True}
    bucket = _bucket(m)

    g = norm_weight.contiguous()
    wg, wu, wd = gate_weight.contiguous(), up_weight.contiguous(), down_weight.contiguous()
    _launch(
        _gate_up_decode if decode else _gate_up_prefill,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(inter, meta["BLOCK_N"]),),
        (x2, g, wg, wu, a, m, inter, hidden, float(eps), bucket),
        common,
        gate_up_config,
    )

    tiles = triton.cdiv(m, 16) * triton.cdiv(hidden, 16)  # upper bound over configs (BLOCK_M, BLOCK_N >= 16)
    if decode or (down_config is not None and down_config.kwargs["SPLIT_K"] > 1):
        ws = torch.empty((MAX_SPLIT_K, m, hidden), dtype=torch.float32, device=x.device)  # (S, M, H) partials
    else:
        ws = _scratch(x.device)  # SPLIT_K == 1 never touches it
    _launch(
        _down_decode if decode else _down_prefill,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"]), meta["SPLIT_K"]),
        (a, wd, x2, out, ws, _counters(x.device, tiles), m, hidden, inter, bucket),
        common,
        down_config,
    )
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------------------------
# What the compile test builds: every kernel with every config, as the launcher would specialise it.

KERNELS = {
    "gate_up_prefill": (_gate_up_kernel, GATE_UP_PREFILL_CONFIGS, 2),
    "gate_up_decode": (_gate_up_kernel, GATE_UP_DECODE_CONFIGS, 2),
    "down_prefill": (_down_kernel, DOWN_PREFILL_CONFIGS, 1),
    "down_decode": (_down_kernel, DOWN_DECODE_CONFIGS, 1),
}
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs(name: str, dtype: torch.dtype):
    """(signature, constexprs, attrs, options) per config of kernel `name` for `dtype`, after the same pruning
    the autotuner applies (fp32 twice: IEEE and TF32 dots); pointers and the K/N strides are marked
    16-divisible as they are at runtime for the model shapes (576, 1536, 4096, 11008)."""
    fn, configs, weight_tiles = KERNELS[name]
    t = _TRITON_DTYPE[dtype]
    if fn is _gate_up_kernel:
        sig = {"x_ptr": f"*{t}", "g_ptr": f"*{t}", "wg_ptr": f"*{t}", "wu_ptr": f"*{t}", "a_ptr": f"*{t}",
               "M": "i32", "N": "i32", "K": "i32", "eps": "fp32", "M_BUCKET": "i32"}
    else:
        sig = {"a_ptr": f"*{t}", "w_ptr": f"*{t}", "x_ptr": f"*{t}", "out_ptr": f"*{t}", "ws_ptr": "*fp32",
               "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32"}
    divisible = [i for i, k in enumerate(sig) if sig[k].startswith("*") or k in ("N", "K")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
    specs = []
    for config in prune_for_dtype(configs, torch.empty((), dtype=dtype).element_size(), weight_tiles):
        for precision in precisions:
            constexprs = dict(config.kwargs, INTERPRETED=False, FP32_PRECISION=precision)
            full_sig = dict(sig, **{k: "constexpr" for k in constexprs})
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
            specs.append((full_sig, constexprs, attrs, options))
    return fn, specs
