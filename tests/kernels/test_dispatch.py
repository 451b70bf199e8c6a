"""Path selection without running a kernel: the reference is the spec, "auto" keeps to it off CUDA and under
autograd, and importing slimlm (or the kernels' dispatcher) loads no triton."""

from __future__ import annotations

import pytest
import torch
from ffn_cases import EPS, make_inputs

from slimlm.kernels.ffn import FusedFFN, auto_impl, fused_ffn, fused_ffn_reference


def test_reference_is_llama_mlp_with_residual():
    """The spec equals a Llama post-attention RMSNorm + MLP + residual, computed by transformers."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, rms_norm_eps=EPS)
    torch.manual_seed(0)
    mlp, norm = LlamaMLP(cfg), LlamaRMSNorm(64, eps=EPS)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        for dtype in (torch.float32, torch.bfloat16):
            mlp.to(dtype), norm.to(dtype)
            x = torch.randn(3, 5, 64).to(dtype)
            want = x + mlp(norm(x))
            got = fused_ffn_reference(x, norm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                                      mlp.down_proj.weight, EPS)
            assert torch.equal(got, want)


def test_auto_is_reference_on_cpu():
    x, g, wg, wu, wd = make_inputs(3, 64, 128, seed=0)
    assert auto_impl(x) == "reference"
    assert torch.equal(fused_ffn(x, g, wg, wu, wd, EPS), fused_ffn_reference(x, g, wg, wu, wd, EPS))


def test_bad_impl():
    x, g, wg, wu, wd = make_inputs(1, 64, 128, seed=0)
    with pytest.raises(ValueError, match="impl"):
        fused_ffn(x, g, wg, wu, wd, EPS, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        FusedFFN(64, 128, impl="fast")


def test_module_keeps_its_names_and_trains_through_the_reference():
    mod = FusedFFN(64, 128, eps=EPS)
    assert set(dict(mod.named_parameters())) == {"norm_weight", "gate_proj.weight", "up_proj.weight",
                                                 "down_proj.weight"}
    x = torch.randn(2, 4, 64)
    y = mod(x)
    assert mod.last_impl == "reference" and mod.path_for(x) == "reference"
    y.square().mean().backward()
    assert all(p.grad is not None for p in mod.parameters())
    with torch.no_grad():
        want = fused_ffn_reference(x, mod.norm_weight, mod.gate_proj.weight, mod.up_proj.weight,
                                   mod.down_proj.weight, EPS)
    torch.testing.assert_close(y.detach(), want, atol=0, rtol=0)


def test_module_forced_reference():
    mod = FusedFFN(64, 128, impl="reference")
    with torch.no_grad():
        mod(torch.randn(2, 64))
    assert mod.last_impl == "reference"
    assert "impl=reference" in repr(mod)


def test_forced_triton_on_cpu_without_interpreter_says_why():
    pytest.importorskip("triton")
    from slimlm.kernels import ffn_triton

    if ffn_triton.INTERPRETED:
        pytest.skip("this process runs the interpreter")
    x, g, wg, wu, wd = make_inputs(2, 64, 128, seed=0)
    with pytest.raises(RuntimeError, match="CUDA"):
        fused_ffn(x, g, wg, wu, wd, EPS, impl="triton")


def test_triton_rejects_mixed_dtypes():
    pytest.importorskip("triton")
    x, g, wg, wu, wd = make_inputs(2, 64, 128, seed=0)
    with pytest.raises(ValueError, match="gate_weight"):
        fused_ffn(x, g, wg.half(), wu, wd, EPS, impl="triton")


def test_bench_without_cuda_measures_nothing(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from slimlm.kernels.bench import main

    assert main(["--rows", "1", "--shapes", "64x128"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    assert not any(ch.isdigit() for ch in out), out


def test_bench_config_is_validated():
    from slimlm.kernels.bench import KernelBenchConfig

    with pytest.raises(ValueError, match="dtype"):
        KernelBenchConfig(dtype="int8")
    with pytest.raises(ValueError, match="rows"):
        KernelBenchConfig(rows=[0])


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "576"], "expected HIDDENxINTERMEDIATE pairs"),
    (["--rows", "a,b"], "expected comma-separated integers"),
    (["--rounds", "0"], "rounds and calls_per_round must be >= 1"),
    (["--rows", "0"], "rows must be positive"),
])
def test_bench_cli_bad_values_are_one_line(argv, message, capsys):
    from slimlm.cli import main

    try:
        code = main(["bench", "kernel", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
