"""CompressConfig: every knob of `slimlm compress`, validated on construction and saved beside the result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from slimlm.errors import SlimlmError

METHODS = ("streamline", "shortgpt", "removal", "width")
BLOCK_CHOICES = ("loss", "cosine")
REPLACEMENTS = ("ffn", "layer", "linear", "none")
TRAIN_LOSSES = ("mse", "kd", "lm")


@dataclass
class CompressConfig:
    """How to compress.

    layers: how many decoder layers to remove (exclusive with `ratio`).
    ratio: fraction of decoder layers to remove, in (0, 1); rounded to the nearest layer count.
    width_ratio: fraction of the parameters to remove by width pruning (MLP channels and attention heads, the same
        width in every layer; compress/width.py), in (0, 1); after the layer removal when both are given.
    width_heads: let width pruning remove attention heads too (the split between heads and MLP channels chosen by
        importance). Off by default: on SmolLM2-135M (3 key/value heads of 64 dimensions per layer), heads removed
        by Taylor importance cost several times the perplexity of the same parameter count in MLP channels.
    width_windows: calibration windows (evenly spaced among them) whose gradients rank the width to remove; each
        costs a forward and backward pass of the model.
    method: "streamline" (a contiguous block, see block_choice, replaced),
        "shortgpt" (the N layers of lowest Block Influence, not necessarily contiguous) or
        "removal" (the streamline block, dropped with no replacement) or "width" (no layer removed: only
        width pruning, see width_ratio).
    block_choice: how streamline and removal choose their contiguous block: "loss" (default: the block whose
        removal changes the model's next-token distribution on the calibration text least, by KL divergence;
        `compress/select.py` `removal_losses`) or "cosine" (LLM-Streamline's
        own rule: the block whose input and output hidden states are most similar).
    replacement: for streamline: "ffn" (trained gated-SiLU MLP with its own RMSNorm and residual),
        "layer" (one trained decoder layer), "linear" (least-squares map folded into the previous
        layer's down projection; no training, no extra parameters) or "none". None picks the method's
        default (ffn for streamline, none otherwise).
    calib: "self" (the model writes its own calibration text), a .txt/.jsonl path, or hf:NAME[:CONFIG[:SPLIT]].
    calib_samples / seq_len: number and length (tokens) of calibration windows.
    heldout: extra calibration windows kept out of scoring and training, to measure the quality kept
        (perplexity and top-1 agreement with the original model on them).
    epochs / lr / batch_size / weight_decay / warmup_frac / val_frac: replacement training (AdamW,
        linear warm-up then cosine decay to lr * min_lr_frac, validation split, keep-best).
    train_loss: "mse" (replacement output vs the removed block's output hidden states), "kd" (after MSE,
        distillation: the pruned model's next-token distribution vs the original's, replacement only) or "lm"
        (after MSE, next-token cross-entropy through the whole frozen pruned model, replacement only).
    lm_epochs: epochs of the "lm" stage.
    kd_epochs / kd_lr / kd_batch_tokens / kd_topk: the "kd" stage (after MSE): epochs, peak learning
        rate, tokens per step, and how many of the original model's most likely next tokens are kept
        per position as the distillation target.
    recover_minutes: whole-model recovery after the replacement (every remaining decoder weight distilled
        against the original model on the calibration text plus on-policy answers of the pruned model; see
        compress/recover.py): its time budget in minutes, sampling included; 0 turns recovery off. The step
        count it allows is measured on the first steps and recorded in slimlm.json (pass it as recover_steps
        to repeat a run exactly on another machine).
    recover_steps: a fixed number of recovery steps instead of the time budget (reproducible anywhere).
    recover_epochs: at most this many passes over the recovery text, whatever the budget allows.
    recover_lr: peak learning rate of recovery (AdamW, warm-up then cosine decay to a tenth). None (default): sized
        to the model, RECOVER_LR_PER_RMS times the RMS of the weight matrices trained (Adam moves every weight by
        about the rate a step, whatever its size: a fixed 2e-4, right for SmolLM2's matrices of RMS 0.19, made
        Gemma 3 270M's, of RMS 0.035, worse). Where the held-out KL rises at an evaluation (4 in the run at
        least), the best weights come back and the rate is quartered (at most RECOVER_BACKOFFS times).
    recover_tokens: on-policy tokens the pruned model writes for recovery (0: calibration text only).
    max_cache_gb: cap on the memory for cached hidden states (kept in bfloat16).
    seed: seeds calibration sampling, the split and training.
    """

    layers: int | None = None
    ratio: float | None = None
    width_ratio: float | None = None
    width_heads: bool = False
    width_windows: int = 32
    method: str = "streamline"
    block_choice: str = "loss"
    replacement: str | None = None
    calib: str = "self"
    calib_samples: int = 64
    seq_len: int = 512
    heldout: int = 4
    epochs: int = 8
    lr: float = 1e-3  # with 256-token batches: see benchmarks/ffn_train_sweep.py
    batch_size: int = 256  # tokens per step for hidden-state (mse) training
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.05
    val_frac: float = 0.1
    train_loss: str = "kd"
    lm_epochs: int = 1
    kd_epochs: int = 3
    kd_lr: float = 5e-4
    kd_batch_tokens: int = 1024
    kd_topk: int = 64
    recover_minutes: float = 5.0
    recover_steps: int | None = None
    recover_epochs: int = 3
    recover_lr: float | None = None
    recover_tokens: int = 16384
    max_cache_gb: float = 4.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.width_ratio is not None and not 0 < self.width_ratio < 1:
            raise SlimlmError(f"--width-ratio must be in (0, 1), got {self.width_ratio}")
        if self.width_windows < 1:
            raise SlimlmError(f"--width-windows must be at least 1, got {self.width_windows}")
        if self.method == "width" and self.width_ratio is None:
            raise SlimlmError("--method width needs --width-ratio R")
        if self.method == "width" and (self.layers is not None or self.ratio is not None):
            raise SlimlmError("--method width removes no layers: to combine, give --layers/--ratio with "
                              "another method and --width-ratio")
        if self.layers is None and self.ratio is None and self.method != "width":
            raise SlimlmError("give --layers N or --ratio R")
        if self.layers is not None and self.ratio is not None:
            raise SlimlmError("give either --layers or --ratio, not both")
        if self.layers is not None and self.layers < 1:
            raise SlimlmError(f"--layers must be at least 1, got {self.layers}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise SlimlmError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise SlimlmError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.block_choice not in BLOCK_CHOICES:
            raise SlimlmError(f"unknown block choice {self.block_choice!r}: use one of {', '.join(BLOCK_CHOICES)}")
        if self.replacement is None:
            self.replacement = "ffn" if self.method == "streamline" else "none"
        if self.replacement not in REPLACEMENTS:
            raise SlimlmError(f"unknown replacement {self.replacement!r}: use one of {', '.join(REPLACEMENTS)}")
        if self.method != "streamline" and self.replacement != "none":
            raise SlimlmError(f"--method {self.method} removes layers without a replacement: use --replacement none")
        if self.train_loss not in TRAIN_LOSSES:
            raise SlimlmError(f"unknown train loss {self.train_loss!r}: use one of {', '.join(TRAIN_LOSSES)}")
        for name in ("calib_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SlimlmError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 2:
            raise SlimlmError("--seq-len must be at least 2")
        if self.kd_topk < 1 or self.kd_batch_tokens < 1:
            raise SlimlmError("kd_topk and kd_batch_tokens must be at least 1")
        if not 0 < self.kd_lr < math.inf:
            raise SlimlmError(f"--kd-lr must be positive and finite, got {self.kd_lr}")
        for name in ("epochs", "kd_epochs", "lm_epochs"):
            if getattr(self, name) < 0:
                raise SlimlmError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not -2**63 <= self.seed < 2**63:
            raise SlimlmError(f"--seed must fit in 64 bits (-2**63 <= seed < 2**63), got {self.seed}")
        if not 0 < self.lr < math.inf:
            raise SlimlmError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 <= self.recover_minutes < math.inf:
            raise SlimlmError(f"--recover-minutes must be 0 (off) or a positive number, got {self.recover_minutes}")
        if self.recover_steps is not None and self.recover_steps < 1:
            raise SlimlmError(f"--recover-steps must be at least 1, got {self.recover_steps}")
        if self.recover_epochs < 1:
            raise SlimlmError(f"--recover-epochs must be at least 1, got {self.recover_epochs}")
        if self.recover_lr is not None and not 0 < self.recover_lr < math.inf:
            raise SlimlmError(f"--recover-lr must be positive and finite, got {self.recover_lr}")
        if self.recover_tokens < 0:
            raise SlimlmError(f"--recover-tokens must be >= 0, got {self.recover_tokens}")
        if not 0 <= self.val_frac < 1:
            raise SlimlmError("val_frac must be in [0, 1)")

    @property
    def recovers(self) -> bool:
        """Whole-model recovery runs (a time budget or a step count is given)."""
        return self.recover_minutes > 0 or self.recover_steps is not None

    def n_remove(self, n_layers: int) -> int:
        """Layers to remove for a model with n_layers (the first layer is never removed)."""
        n = self.layers if self.layers is not None else max(1, round(self.ratio * n_layers))
        if n >= n_layers:
            raise SlimlmError(
                f"cannot remove {n} of {n_layers} layers: at most {n_layers - 1} (the first layer is kept)")
        return n

    def to_dict(self) -> dict:
        return asdict(self)
