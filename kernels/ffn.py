"""The replacement FFN: y = x + W_down(silu(W_gate n) * (W_up n)), n = rmsnorm(x) * g.

`fused_ffn_reference` is the spec in plain PyTorch. `fused_ffn` dispatches between it and the Triton kernels
(`slimlm.kernels.ffn_triton`: RMSNorm in the gate/up prologue, gate and up in one pass with SiLU * up in the
epilogue, the residual add in the down projection's epilogue). `FusedFFN` is the module the compress stage
inserts; it picks the path per call.

The kernels live in their own file because it imports triton at the top: this one must not (triton is
optional, and `import slimlm` loads no triton), so it imports them only when the Triton path runs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

IMPLS = ("auto", "triton", "reference")

# dtypes the Triton kernels take; anything else runs the reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_ffn_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Reference: RMSNorm (computed in fp32, as Llama does), gated SiLU MLP, residual add."""
    dtype = x.dtype
    h = x.float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = norm_weight * n.to(dtype)
    a = torch.nn.functional.silu(torch.nn.functional.linear(n, gate_weight)) * torch.nn.functional.linear(n, up_weight)
    return x + torch.nn.functional.linear(a, down_weight)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module():
    try:
        from slimlm.kernels import ffn_triton
    except ImportError as exc:
        raise ImportError(f"the Triton FFN needs triton: pip install 'slimlm[triton]' ({exc})") from exc
    return ffn_triton


# The kernels' tiles are tuned and compile-tested for sm_80 and sm_90; bf16 tensor-core dots need sm_80.
MIN_CAPABILITY = (8, 0)


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= MIN_CAPABILITY


def auto_impl(x: torch.Tensor) -> str:
    """The path "auto" takes for input `x`: "triton" for CUDA tensors (sm_80 or newer) of a supported dtype,
    with triton installed, outside autograd, ONNX export and torch.compile tracing; "reference" otherwise."""
    if not x.is_cuda or x.dtype not in TRITON_DTYPES:
        return "reference"
    if torch.is_grad_enabled() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return "reference"
    return "triton" if triton_installed() and _capable(x.device.index) else "reference"


class _TritonFFN(torch.autograd.Function):
    """The Triton forward with a backward through the reference (recomputed), for a forced "triton" path under
    autograd. Training normally takes the reference directly ("auto" does)."""

    @staticmethod
    def forward(ctx, x, norm_weight, gate_weight, up_weight, down_weight, eps):
        ctx.save_for_backward(x, norm_weight, gate_weight, up_weight, down_weight)
        ctx.eps = eps
        return _triton_module().fused_ffn_triton(x, norm_weight, gate_weight, up_weight, down_weight, eps)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            y = fused_ffn_reference(*inputs, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_out) if wanted else [])
        return (*[next(grads) if t.requires_grad else None for t in inputs], None)


def fused_ffn(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    eps: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Run the replacement FFN with the chosen implementation ("auto", "triton" or "reference").

    x: (..., H); weights in nn.Linear layout: norm (H,), gate and up (I, H), down (H, I). "triton" runs the
    kernels on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "auto":
        impl = auto_impl(x)
    if impl == "reference":
        return fused_ffn_reference(x, norm_weight, gate_weight, up_weight, down_weight, eps)
    tensors = (x, norm_weight, gate_weight, up_weight, down_weight)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _TritonFFN.apply(*tensors, eps)
    return _triton_module().fused_ffn_triton(*tensors, eps)


class FusedFFN(torch.nn.Module):
    """The replacement FFN module: its own RMSNorm weight, gate/up/down projections and a residual.

    `impl` picks the path: "auto" (Triton on CUDA for inference; the reference on other devices, under
    autograd, during ONNX export and torch.compile tracing), "triton" or "reference" to force one.
    `last_impl` names the path that ran last ("triton" or "reference"); `path_for(x)` the one a call would take.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.eps = eps
        self.impl = impl
        self.norm_weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False)
        self.last_impl = "reference"

    def path_for(self, x: torch.Tensor) -> str:
        """"triton" or "reference": the path forward(x) takes now."""
        return auto_impl(x) if self.impl == "auto" else self.impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.path_for(x)
        self.last_impl = impl
        return fused_ffn(
            x, self.norm_weight, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.eps, impl=impl
        )

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, eps={self.eps}, impl={self.impl}"


class ModuleFFN(FusedFFN):
    """A replacement FFN whose gate/up/down projections are given modules, such as bitsandbytes layers (their
    packed weights cannot go through `F.linear`).

    It keeps the `FusedFFN` attributes (norm_weight, gate_proj, up_proj, down_proj, eps, impl) and computes the
    reference formula by calling the modules.
    """

    def __init__(self, norm_weight: torch.Tensor, gate_proj, up_proj, down_proj, eps: float = 1e-6):
        super().__init__(norm_weight.shape[0], up_proj.out_features, eps=eps)
        self.norm_weight = torch.nn.Parameter(norm_weight.detach(), requires_grad=False)
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        self.last_impl = "reference"
        h = x.float()
        n = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(n)) * self.up_proj(n))
