"""Replacements for a removed block, and their training.

- ffn: a gated-SiLU MLP with its own RMSNorm and a residual (`FusedFFN`; in families whose MLP block differs,
  such as Gemma's GELU MLP with a norm on its output, the family's own modules: `BlockFFN`), initialised from
  the first removed layer's MLP and its norms, trained token by token to map the block's input hidden
  states onto its output hidden states (MSE).
- layer: one decoder layer initialised from the first removed layer, trained the same way on whole
  windows (attention needs positions).
- linear: no training; T = argmin ||M T - (Y - X)||^2 in closed form (ridge-stabilised normal
  equations in float64), where M is the MLP output of the layer before the block, X the block's
  input and Y its output (the idea of ReplaceMe, arXiv 2505.02819). Folded into that layer's down
  projection: W' = (I + T)^T W, so the model keeps its plain architecture with N fewer layers.
- kd stage (`--train-loss kd`, after MSE): distillation. The replacement is trained so that the pruned
  model's next-token distribution matches the original model's (cross-entropy against the original's
  top-k probabilities, kept from the scoring pass), through the frozen rest of the model. The block's
  input hidden states are cached, so only the replacement and the layers after it run.
- lm stage (`--train-loss lm`): next-token cross-entropy through the whole frozen pruned model,
  updating only the replacement (the paper's second variant).
"""

from __future__ import annotations

import copy
import math
import time

import torch

from slimlm.data import fast_autocast
from slimlm.families import causal_mask, layer_index, rotary_for, sliding_window
from slimlm.models import FFNLayer, decoder_layers, family_of, ffn_from_layer, get_attr, tail_layers

# Ridge term for the least-squares map, relative to the mean eigenvalue of M^T M: small enough not to
# bias a well-posed solve, large enough to keep near-singular directions (dead MLP channels) finite.
LINEAR_RIDGE = 1e-4


def new_ffn_slot(model, first_removed: int) -> FFNLayer:
    return FFNLayer(ffn_from_layer(model, decoder_layers(model)[first_removed]), first_removed)


def new_layer(model, first_removed: int) -> torch.nn.Module:
    return copy.deepcopy(decoder_layers(model)[first_removed])


def _schedule(optimizer, total_steps: int, warmup_frac: float, min_lr_frac: float):
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _split(n: int, val_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_frac)) if n > 1 else 0
    n_val = min(max(n_val, 1 if val_frac > 0 and n > 1 else 0), n - 1)
    return perm[n_val:], perm[:n_val]


def _layer_call(model, layer, x: torch.Tensor) -> torch.Tensor:
    """Run one decoder layer on whole windows (causal, positions 0..T-1)."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device)[None].expand(x.shape[0], t)
    idx = layer_index(model, layer)
    rope = rotary_for(model, x, pos, idx)
    mask = causal_mask(t, t, sliding_window(model, idx), x.dtype, x.device)
    out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def train_mse(model, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, kind: str) -> dict:
    """Fit module(x) ~ y. x, y: (n_windows, T, H) on the CPU (reduced precision). Keeps the best
    validation state. Returns the history (per-epoch train/val MSE, the epoch 0 row is before training)."""
    from tqdm.auto import tqdm

    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    train_idx, val_idx = _split(x.shape[0], cfg.val_frac, cfg.seed)
    if kind == "ffn":  # token level: any token is an independent example
        xt, yt = x[train_idx].flatten(0, 1), y[train_idx].flatten(0, 1)
        xv, yv = x[val_idx].flatten(0, 1), y[val_idx].flatten(0, 1)
        batch = cfg.batch_size
        run = module
    else:  # window level, for attention
        xt, yt, xv, yv = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        batch = max(1, cfg.batch_size // x.shape[1])

        def run(inp):
            return _layer_call(model, module, inp)

    def evaluate(xs, ys):
        if len(xs) == 0:
            return float("nan")
        total, count = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(xs), batch):
                inp = xs[s:s + batch].to(device, dtype)
                out = run(inp)
                total += float(torch.nn.functional.mse_loss(out.float(), ys[s:s + batch].to(device).float(),
                                                            reduction="sum"))
                count += out.numel()
        return total / count

    steps_per_epoch = math.ceil(len(xt) / batch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, total_steps, cfg.warmup_frac, cfg.min_lr_frac)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = [{"epoch": 0, "train_mse": evaluate(xt[:max(batch * 8, 1)], yt[:max(batch * 8, 1)]),
                "val_mse": evaluate(xv, yv), "lr": 0.0, "seconds": 0.0}]
    best_val, best_state = history[0]["val_mse"], copy.deepcopy(module.state_dict())
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"training {kind} replacement", unit="step", disable=not cfg.progress)
    for epoch in range(1, cfg.epochs + 1):
        module.train()
        perm = torch.randperm(len(xt), generator=gen)
        run_loss, run_n = 0.0, 0
        for s in range(0, len(xt), batch):
            idx = perm[s:s + batch]
            inp, tgt = xt[idx].to(device, dtype), yt[idx].to(device).float()
            loss = torch.nn.functional.mse_loss(run(inp).float(), tgt)
            _step(opt, sched, params, loss)
            run_loss += loss.item() * len(idx)
            run_n += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
        module.eval()
        val = evaluate(xv, yv)
        row = {"epoch": epoch, "train_mse": run_loss / max(1, run_n), "val_mse": val,
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        history.append(row)
        if cfg.progress:
            bar.write(f"epoch {epoch}/{cfg.epochs}: train mse {row['train_mse']:.5g}  val mse {val:.5g}")
        best_val, best_state = _keep_best(module, val, best_val, best_state)
    bar.close()
    module.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    per_row = 1 if kind == "ffn" else x.shape[1]
    return {"history": history, "best_val_mse": best_val, "train_tokens": int(xt.shape[0] * per_row),
            "val_tokens": int(xv.shape[0] * per_row)}


def _step(opt, sched, params, loss) -> None:
    """One optimizer step of the replacement trainings: backward, gradient norm clipped to 1, AdamW, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _keep_best(module, val: float, best: float, best_state: dict) -> tuple[float, dict]:
    """Keep-best on the validation loss: the new (best, state) after an epoch that scored `val` (NaN, when there is
    no validation split, keeps the latest weights)."""
    if not math.isnan(val) and (math.isnan(best) or val < best):
        return val, copy.deepcopy(module.state_dict())
    if math.isnan(val):
        return best, copy.deepcopy(module.state_dict())
    return best, best_state


@torch.no_grad()
def solve_linear(mlp_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 chunk: int = 8192) -> tuple[torch.Tensor, dict]:
    """T (H, H) minimising ||M T - (Y - X)||^2, accumulated over token chunks in float64."""
    h = x.shape[-1]
    m, d = mlp_out.reshape(-1, h), (y.float() - x.float()).reshape(-1, h)
    mtm = torch.zeros(h, h, dtype=torch.float64)
    mtd = torch.zeros(h, h, dtype=torch.float64)
    for s in range(0, m.shape[0], chunk):
        mc, dc = m[s:s + chunk].double(), d[s:s + chunk].double()
        mtm += mc.T @ mc
        mtd += mc.T @ dc
    lam = LINEAR_RIDGE * float(torch.trace(mtm)) / h
    t = torch.linalg.solve(mtm + lam * torch.eye(h, dtype=torch.float64), mtd)
    # relative residual of the fit, for the report
    res, tot = 0.0, 0.0
    for s in range(0, m.shape[0], chunk):
        mc, dc = m[s:s + chunk].double(), d[s:s + chunk].double()
        res += float(((mc @ t - dc) ** 2).sum())
        tot += float((dc ** 2).sum())
    return t, {"relative_residual": res / max(tot, 1e-30), "ridge": lam, "tokens": int(m.shape[0])}


@torch.no_grad()
def fold_linear(model, layer_before: int, t: torch.Tensor) -> None:
    """Merge mlp_out -> mlp_out (I + T) into the down projection of `layer_before`."""
    down = get_attr(decoder_layers(model)[layer_before], family_of(model).mlp_down)
    w = down.weight.double()  # (H, I)
    eye = torch.eye(t.shape[0], dtype=torch.float64, device=w.device)
    down.weight.copy_(((eye + t.to(w.device)).T @ w).to(down.weight.dtype))
    if getattr(down, "bias", None) is not None:
        down.bias.copy_(((eye + t.to(w.device)).T @ down.bias.double()).to(down.bias.dtype))


def _fine_tune(model, module: torch.nn.Module, n: int, loss_of, *, lr: float, epochs: int, batch: int, cfg,
               seed: int, key: str, desc: str) -> dict:
    """Train only `module` through the frozen model: AdamW, warm-up + cosine, keep-best on a validation split.

    loss_of(rows) -> scalar loss over the examples `rows` (indices into 0..n-1). History rows carry
    `train_<key>` / `val_<key>` (epoch 0: validation before training).
    """
    from tqdm.auto import tqdm

    train_idx, val_idx = _split(n, cfg.val_frac, seed)
    steps = max(1, math.ceil(len(train_idx) / batch) * epochs)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, steps, cfg.warmup_frac, cfg.min_lr_frac)

    def val_loss():
        if len(val_idx) == 0:
            return float("nan")
        with torch.no_grad():
            total = 0.0
            for s in range(0, len(val_idx), batch):
                rows = val_idx[s:s + batch]
                total += float(loss_of(rows)) * len(rows)
        return total / len(val_idx)

    was_training = model.training
    model.eval()  # frozen layers as at inference (no dropout)
    history = [{"epoch": 0, f"val_{key}": val_loss(), "seconds": 0.0}]
    best, best_state = history[0][f"val_{key}"], copy.deepcopy(module.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not cfg.progress)
    t0 = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
            run, count = 0.0, 0
            for s in range(0, len(perm), batch):
                rows = perm[s:s + batch]
                loss = loss_of(rows)
                _step(opt, sched, params, loss)
                run += loss.item() * len(rows)
                count += len(rows)
                bar.update(1)
                bar.set_postfix({key: f"{loss.item():.4g}"})
            v = val_loss()
            history.append({"epoch": epoch, f"train_{key}": run / max(1, count), f"val_{key}": v,
                            "seconds": time.perf_counter() - t0})
            if cfg.progress:
                bar.write(f"{desc} epoch {epoch}/{epochs}: train {run / max(1, count):.5g}  val {v:.5g}")
            best, best_state = _keep_best(module, v, best, best_state)
    finally:
        bar.close()
        model.train(was_training)
        module.load_state_dict(best_state)
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return {"history": history, f"best_val_{key}": best, "train_windows": int(len(train_idx)),
            "val_windows": int(len(val_idx))}


def train_lm(model, module: torch.nn.Module, windows: torch.Tensor, cfg) -> dict:
    """Next-token cross-entropy through the whole pruned model; only `module` is updated."""
    device = next(model.parameters()).device

    def loss_of(rows):
        ids = windows[rows].to(device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return _fine_tune(model, module, len(windows), loss_of, lr=cfg.lr * 0.1, epochs=cfg.lm_epochs,
                      batch=max(1, cfg.batch_size // windows.shape[1]), cfg=cfg, seed=cfg.seed + 1, key="ce",
                      desc="training replacement (lm loss)")


def kd_loss(logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_k p_teacher(k) log q_student(k) over the teacher's top-k tokens
    (teacher probabilities renormalised over them). logits (..., V); idx, logp (..., k)."""
    p = torch.softmax(logp.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1).gather(-1, idx.long())
    return -(p * q).sum(-1).mean()


def train_kd(model, module: torch.nn.Module, start: int, x: torch.Tensor, teacher: dict, cfg) -> dict:
    """Distil the original model into the pruned one, updating only `module` (decoder slot `start`).

    x: (n, T, H) hidden states entering the block (the replacement's input), per calibration window;
    teacher: {"idx", "logp"} (n, T, k) top-k log-probabilities of the original model on those windows.
    Keeps the state of best validation loss. Returns the history.
    """
    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype

    def loss_of(rows):
        inp = x[rows].to(device, dtype)
        with tail_layers(model, start), fast_autocast(model):
            logits = model(inputs_embeds=inp, use_cache=False).logits
        return kd_loss(logits, teacher["idx"][rows].to(device), teacher["logp"][rows].to(device))

    out = _fine_tune(model, module, x.shape[0], loss_of, lr=cfg.kd_lr, epochs=cfg.kd_epochs,
                     batch=max(1, cfg.kd_batch_tokens // x.shape[1]), cfg=cfg, seed=cfg.seed + 3, key="kd",
                     desc="distilling replacement")
    return {**out, "topk": int(teacher["idx"].shape[-1])}
