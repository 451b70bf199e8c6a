"""A tiny random Llama with one decoder layer replaced by a FusedFFN: the interpreted Triton path gives the
reference path's logits and the same greedy tokens (interp_worker.task_minimodel builds and runs it)."""

from __future__ import annotations

import pytest
import torch
from ffn_cases import check_close

pytest.importorskip("triton")


def test_fp32_logits_and_greedy_tokens(interpreted_minimodel):
    r = interpreted_minimodel["minimodel-fp32"]
    assert bool(r["ran_reference"]) and bool(r["ran_triton"])
    # fp32 throughout: the two paths differ only in summation order.
    torch.testing.assert_close(r["logits_triton"], r["logits_reference"], atol=1e-4, rtol=1e-4)
    assert torch.equal(r["tokens_triton"], r["tokens_reference"]), (r["tokens_triton"], r["tokens_reference"])


def test_bf16_logits_within_pytorch_error(interpreted_minimodel):
    r = interpreted_minimodel["minimodel-bf16"]
    assert bool(r["ran_triton"])
    check_close(r["logits_triton"].bfloat16(), r["logits_reference"].bfloat16(), r["logits_ref32"], torch.bfloat16,
                "minimodel-bf16 logits")
