"""Shared by the kernel tests and their interpreter worker: the shape cases, inputs, and the tolerance check.

The check compares the fused output with the fp32 reference, per element, against the error plain PyTorch makes
in the same dtype: |out - ref32| <= 2 * |torch_same_dtype - ref32| + atol + rtol * |ref32|; and over the whole
tensor, rms(out - ref32) <= RMS_RATIO * rms(torch_same_dtype - ref32) (+ atol / 8).
"""

from __future__ import annotations

import torch

EPS = 1e-6

# (hidden, intermediate): the SmolLM2-135M shape, small powers of two, and sizes that are no multiple of any
# tile (72, 200, 257, 528 = 16 * 33) so that every mask and K tail is exercised.
SHAPES = [(64, 128), (72, 200), (96, 257), (200, 528), (576, 1536)]
# Rows: decode (1, 3, 16 = the decode limit) and prefill with a ragged last row tile (129).
ROWS = [1, 3, 16, 129]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (atol, rtol) per dtype, on top of twice PyTorch's own error; u is the unit roundoff (2^-11 fp16, 2^-8 bf16).
# atol = 8u: the outputs here have FFN branches of unit scale, on which PyTorch's rms error is 1.2-2.4 u (its
# roundings of n, gate, up, the product and the down output); a per-element comparison needs a few of those
# sigmas where PyTorch lands near-exact by chance and the fused path does not (x + ffn cancelling included).
# rtol = 2u: one rounding step of a large output (|y| up to ~25 with the outlier channels).
# fp32: PyTorch in fp32 *is* ref32, so only accumulation order differs: a K-term fp32 sum of O(1) terms moves by
# about sqrt(K) * 2^-24 * 4, 1e-5 at K = 1536 (interpreted cases), 2.5e-5 at K = 11008 (the GPU tests' 7B shape).
TOLERANCES = {
    torch.float32: (3e-5, 3e-5),
    torch.float16: (8 * 2.0**-11, 2 * 2.0**-11),
    torch.bfloat16: (8 * 2.0**-8, 2 * 2.0**-8),
}
# On average the fused path must be as accurate as PyTorch in the same dtype (it rounds less often): its rms
# error may exceed PyTorch's by this factor at most (measured 0.8-1.03 on the shape cases).
RMS_RATIO = 1.25


def make_inputs(m: int, hidden: int, inter: int, seed: int, lead: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """fp32 inputs at the scale of a trained model: unit activations with a few large channels, weights with
    unit-variance outputs, a norm weight around 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, hidden, generator=gen)
    x[..., :: max(1, hidden // 4)] *= 8.0  # a few outlier channels, as residual streams have
    g = 1.0 + 0.2 * torch.randn(hidden, generator=gen)
    wg = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    wu = torch.randn(inter, hidden, generator=gen) / hidden**0.5
    wd = torch.randn(hidden, inter, generator=gen) / inter**0.5
    return [x, g, wg, wu, wd]


def shape_cases() -> list[tuple[str, int, int, int, str]]:
    """(case id, M, hidden, intermediate, dtype name) for every shape, row count and dtype, except the largest
    shape at M = 3 and 16 (the slowest to interpret; those rows are covered at every other shape)."""
    return [
        (f"{dt}-M{m}-H{h}-I{i}", m, h, i, dt)
        for (h, i) in SHAPES
        for m in ROWS
        for dt in DTYPES
        if (h, i) != SHAPES[-1] or m in (ROWS[0], ROWS[-1])
    ]


def check_close(out: torch.Tensor, same_dtype: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, what: str):
    """Assert the criterion above, and the rms bound; on failure report max/mean errors of both and the worst
    element."""
    __tracebackhide__ = True
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    err = (out.float() - ref32).abs()
    base = (same_dtype.float() - ref32).abs()
    bound = 2 * base + atol + rtol * ref32.abs()
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, err - bound, torch.zeros_like(err))))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance (atol={atol:g}, rtol={rtol:g}); "
            f"fused max/mean err {err.max():.3g}/{err.mean():.3g}, torch {dtype} max/mean err "
            f"{base.max():.3g}/{base.mean():.3g}; worst at flat index {worst}: "
            f"fused {out.flatten()[worst].item():.6g}, torch {same_dtype.flatten()[worst].item():.6g}, "
            f"ref32 {ref32.flatten()[worst].item():.6g}"
        )
    if err.numel():
        rms, rms_base = err.pow(2).mean().sqrt().item(), base.pow(2).mean().sqrt().item()
        assert rms <= RMS_RATIO * rms_base + atol / 8, (
            f"{what}: fused rms error {rms:.3g} > {RMS_RATIO} x torch {dtype} rms error {rms_base:.3g}; "
            f"fused max/mean err {err.max():.3g}/{err.mean():.3g}, torch {base.max():.3g}/{base.mean():.3g}"
        )
