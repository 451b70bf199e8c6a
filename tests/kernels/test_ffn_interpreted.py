"""The Triton FFN kernels, run on CPU by the Triton interpreter, against the fp32 reference.

Shapes cross hidden 64..576 (and 72, 200, 96), intermediate 128..1536 (and 257, 528), M in {1, 3, 16, 129},
fp32/fp16/bf16; every autotune config is also forced once. The runs happen in a TRITON_INTERPRET=1 subprocess
(conftest.py, interp_worker.py); the tolerance is `ffn_cases.check_close`.
"""

from __future__ import annotations

import pytest
import torch
from ffn_cases import DTYPES, check_close, shape_cases

pytest.importorskip("triton")

CASES = shape_cases()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_shapes(interpreted_shapes, case):
    r = interpreted_shapes[case]
    check_close(r["out"], r["same"], r["ref32"], DTYPES[case.split("-")[0]], case)


def _config_cases():
    from slimlm.kernels import ffn_triton as ft

    ids = []
    for kind, (gate_up, down, rows) in {
        "prefill": (ft.GATE_UP_PREFILL_CONFIGS, ft.DOWN_PREFILL_CONFIGS, (129, 33)),
        "decode": (ft.GATE_UP_DECODE_CONFIGS, ft.DOWN_DECODE_CONFIGS, (16, 3)),
    }.items():
        ids += [f"{kind}{j}-{dt}-M{m}" for j in range(max(len(gate_up), len(down))) for dt, m in zip(("bf16", "fp16"),
                                                                                                       rows)]
        ids.append(f"{kind}-fp32-M{rows[0]}")
    return ids


@pytest.mark.parametrize("case", _config_cases())
def test_every_config(interpreted_shapes, case):
    r = interpreted_shapes[case]
    check_close(r["out"], r["same"], r["ref32"], DTYPES[case.split("-")[1]], case)


def test_split_k_covers_every_decode_split():
    from slimlm.kernels import ffn_triton as ft

    assert {c.kwargs["SPLIT_K"] for c in ft.DOWN_DECODE_CONFIGS} >= {1, 4, 8}


@pytest.mark.parametrize("case", ["batched-bf16", "strided-fp16", "empty-fp32"])
def test_layouts(interpreted_shapes, case):
    r = interpreted_shapes[case]
    check_close(r["out"], r["same"], r["ref32"], DTYPES[case.split("-")[1]], case)


def test_forced_triton_under_autograd_has_reference_gradients(interpreted_shapes):
    r = interpreted_shapes["autograd-fp32"]
    assert bool(r["has_grad_fn"])
    torch.testing.assert_close(r["y"], r["y_ref"], atol=1e-5, rtol=1e-5)
    for j in range(5):  # recomputed through the reference, so equal up to the recomputation
        torch.testing.assert_close(r[f"grad{j}"], r[f"grad_ref{j}"], atol=1e-6, rtol=1e-6)


def test_module_forced_triton(interpreted_shapes):
    r = interpreted_shapes["module-fp32"]
    torch.testing.assert_close(r["y"], r["y_ref"], atol=1e-5, rtol=1e-5)
