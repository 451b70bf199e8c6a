"""Quantization-aware distillation before an int4 ONNX export.

Round-to-nearest 4-bit blocks cost a small model much of its quality (SmolLM2-135M compressed 7 of 30: WikiText
perplexity +24% with every decoder matrix at 4 bits). Instead of keeping the sensitive matrices at 8 bits (more
bytes, and a decode step of a small model is bound by the bytes it reads), `quantization_aware` trains the model
to live on the 4-bit grid it will be exported to:

- every weight matrix of the decoder layers is replaced in the forward pass by its block-wise round-to-nearest
  quantization (`BlockFakeQuant`: asymmetric, min-max per block of `block` input channels, exactly the grid
  onnxruntime's RTN quantizer writes as MatMulNBits), with a straight-through gradient to the latent weight;
- the unquantized model is the teacher, and whole-model recovery (`slimlm.compress.recover`: top-k KL on the
  model's own writing, keep-best on held-out windows, a time budget) distils it into the quantized one. Without
  recovery's on-policy samples: the quantized model stays close to its teacher (its answers do not loop as a
  pruned model's do), and sampling them took most of a 5-minute budget (11 training steps of SmolLM2-135M);
  the teacher's own text is the data, as in LLM-QAT (arXiv 2305.17888);
- the weights are then left on the grid (each matrix replaced by its quantized value), so the PyTorch model is
  the exported model and the RTN export reproduces it block for block.

The data is the model's own text (`calibration_windows(..., "self")`): no dataset, nothing downloaded.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from slimlm.compress.config import CompressConfig
from slimlm.errors import SlimlmError


class BlockFakeQuant(torch.nn.Module):
    """A weight (out, in) quantized per block of `block` input channels to `bits` bits, round to nearest,
    asymmetric: scale = (max - min) / (2^bits - 1), zero point = round(-min / scale), as onnxruntime's RTN
    weight-only quantizer computes them. Forward returns the dequantized weight; the gradient passes straight
    through to the latent weight."""

    def __init__(self, block: int, bits: int):
        super().__init__()
        self.block, self.maxq = block, 2 ** bits - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        x = w.reshape(n, k // self.block, self.block)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = torch.where(hi > lo, (hi - lo) / self.maxq, torch.ones_like(hi))
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(x / scale + zero), 0, self.maxq) - zero) * scale
        return (x + (q - x).detach()).reshape(n, k)


def matrix_bits(model, block: int, keep8: tuple[str, ...], keep8_layers: str) -> dict[str, int]:
    """{qualified name of an nn.Linear in the decoder layers: its bits in the int4 export}: 8 for the names
    `keep8` selects (matched against the end of the name, in the layers `keep8_layers` allows, as
    `slimlm.export.onnx_quant` matches the traced MatMuls), 4 for the rest. Matrices narrower than a block are left
    out (the export keeps them in float); one whose input width is not a multiple of `block` is refused (the
    export would pad it, this training cannot)."""
    from slimlm.export.onnx_quant import more_bits, names_match
    from slimlm.models import decoder_layers

    layers = decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear) or mod.in_features < block:  # the latter stays in float
                continue
            if mod.in_features % block:
                raise SlimlmError(f"layer {i} {name}: input width {mod.in_features} is not a multiple of the block "
                                  f"size {block}")
            flat = name.replace(".", "_")
            wide = any(names_match(flat, k) for k in keep8)
            if keep8_layers == "mixed" and not more_bits(i, len(layers)):
                wide = False
            out[f"{i}.{name}"] = 8 if wide else 4
    return out


@dataclass
class _RecoverSettings:
    """The fields `slimlm.compress.recover.recover` reads; what is not set here is `slimlm compress`'s default."""

    recover_minutes: float
    recover_steps: int | None
    recover_tokens: int = 0  # no on-policy samples (module docstring)
    recover_epochs: int = CompressConfig.recover_epochs
    recover_lr: float = 2e-4  # fixed, as measured for quantization-aware training (not sized to the weights)
    kd_topk: int = CompressConfig.kd_topk
    kd_batch_tokens: int = CompressConfig.kd_batch_tokens
    seed: int = 0
    progress: bool = True


def quantization_aware(model, tokenizer, bits: dict[str, int], block: int, minutes: float,
                       steps: int | None = None, samples: int = 64, seq_len: int = 512, heldout: int = 4,
                       seed: int = 0, progress: bool = True, log=None) -> dict:
    """Distil `model` (in place) into its own block-quantized self; `bits` from `matrix_bits`. Afterwards every
    matrix named there holds its quantized value. Returns the record (history, held-out KL before and after,
    timings)."""
    from torch.nn.utils import parametrize

    from slimlm.compress.recover import recover
    from slimlm.compress.select import score_layers
    from slimlm.data import calibration_windows
    from slimlm.models import decoder_layers

    t0 = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    windows = calibration_windows(teacher, tokenizer, "self", samples + heldout, seq_len, seed, progress=progress)
    windows, held = windows[:-heldout], windows[-heldout:]
    _, targets = score_layers(teacher, windows, progress=progress, topk=_RecoverSettings.kd_topk)
    calib_s = time.perf_counter() - t0

    layers = decoder_layers(model)
    modules = {}
    for key, b in bits.items():
        i, name = key.split(".", 1)
        mod = layers[int(i)].get_submodule(name)
        parametrize.register_parametrization(mod, "weight", BlockFakeQuant(block, b))
        modules[key] = mod
    try:
        settings = _RecoverSettings(recover_minutes=minutes, recover_steps=steps, seed=seed, progress=progress)
        record = recover(model, teacher, tokenizer, windows, targets, held, settings, log=log)
    finally:
        for mod in modules.values():  # the weights stay on the grid: the model is now the quantized one
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    del teacher
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    history = record["history"]
    return {"block_size": block, "matrices": {"int4": sum(b == 4 for b in bits.values()),
                                              "int8": sum(b == 8 for b in bits.values())},
            "heldout_kl_before": history[0]["val_kl"], "heldout_kl_after": record["best_val_kl"],
            "steps": record["steps"], "calibration_s": round(calib_s, 2),
            "seconds": round(time.perf_counter() - t0, 2), "history": history}
