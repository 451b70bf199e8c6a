"""The replacement FFN: y = x + W_down(silu(W_gate n) * (W_up n)), n = rmsnorm(x) * g.

`fused_ffn_reference` is the spec in plain PyTorch; `fused_ffn` dispatches between it and the
Triton kernels.
"""

from __future__ import annotations

import torch


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


def fused_ffn(x, norm_weight, gate_weight, up_weight, down_weight, eps, impl: str = "auto"):
    """Run the replacement FFN with the chosen implementation ("auto", "triton" or "reference")."""
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "reference" or (impl == "auto" and not x.is_cuda):
        return fused_ffn_reference(x, norm_weight, gate_weight, up_weight, down_weight, eps)
    raise NotImplementedError("the Triton path is not built yet")


class FusedFFN(torch.nn.Module):
    """The replacement FFN module: its own RMSNorm weight, gate/up/down projections and a residual.

    `impl` picks the path: "auto" (Triton on CUDA, the reference elsewhere and while exporting),
    "triton" or "reference" to force one. `last_impl` names the path that ran last.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.eps = eps
        self.impl = impl
        self.norm_weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False)
        self.last_impl = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(type(m) is not torch.nn.Linear for m in (self.gate_proj, self.up_proj, self.down_proj)):
            # quantized projections (bitsandbytes layers): the reference formula, calling the modules
            self.last_impl = "reference"
            h = x.float()
            n = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(n)) * self.up_proj(n))
        impl = self.impl
        if impl == "auto" and (not x.is_cuda or torch.is_grad_enabled() or torch.onnx.is_in_onnx_export()):
            impl = "reference"
        self.last_impl = "reference" if impl == "reference" else "triton"
        return fused_ffn(
            x, self.norm_weight, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.eps, impl=impl
        )

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, eps={self.eps}, impl={self.impl}"
