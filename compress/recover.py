"""Whole-model recovery: distil the original model into the pruned one, every remaining weight trained.

After the removed block is replaced, the pruned model still differs from the original everywhere after
the block: the later layers were trained to read what the removed layers wrote. Recovery trains every
decoder weight left (attention, MLPs, norms, the replacement; the tied embedding and output head stay
frozen) so that the pruned model's next-token distribution matches the original's, as Minitron recovers
with logit-only distillation and the Cerebras self-data distillation does on text the original model
wrote itself (arXiv 2410.09982).

The text is two kinds, both data-free:
- the calibration windows (the original model's own writing, or the user's `--calib` text), scored by
  the original model during layer scoring (its top-k next-token log-probabilities are already cached);
- on-policy samples (GKD, arXiv 2306.13649): the pruned model answers instructions itself, greedily and by
  sampling, and the original model scores every position of those answers. This is where the pruned
  model's own failure modes show up (answers that loop or never stop), so the teacher can correct them.

The loss is the forward KL from the original's distribution over its top-k tokens plus one bucket for the
rest of the vocabulary (so the target is a full distribution, not a renormalised top-k). The output head
runs over at most `LOGIT_ROWS` positions at a time with its gradient accumulated chunk by chunk, so no
(batch x length x vocabulary) float32 tensor beyond that cap exists. Keep-best on held-out windows.
"""

from __future__ import annotations

import math
import time

import torch

from slimlm.data import fast_autocast, onpolicy_prompts, pack_stream, sampling_model
from slimlm.generate import generate_batch
from slimlm.models import decoder_layers

# Rows of full-vocabulary logits alive at once in the loss (512 x 49k vocab x 4 B = 100 MB, plus softmax).
LOGIT_ROWS = 512
# On-policy sampling: rows per generate call, longest answer, temperature of the sampled half (the greedy half
# shows the loops users meet; the sampled half keeps the text varied).
ONPOLICY_BATCH = 48
ONPOLICY_MAX_NEW_TOKENS = 160
ONPOLICY_TEMPERATURE = 0.7
# Held-out evaluations at least this many times in a run; where one is worse than the best so far, the best
# weights come back, Adam's moments are reset and the learning rate is multiplied by RECOVER_BACKOFF, at most
# RECOVER_BACKOFFS times.
RECOVER_EVALS = 4
RECOVER_BACKOFF = 0.25
RECOVER_BACKOFFS = 3
# The peak learning rate per unit of weight-matrix RMS (`initial_lr`). The rates recovery settled on after its
# backoffs, over those RMSs: SmolLM2-135M 5e-5 / 0.194 = 2.6e-4, Gemma 3 270M 1.25e-5 / 0.035 = 3.6e-4
# (runs/smollm2-7v3, runs/gemma3-4v3: both started at 2e-4 and backed off, once and twice); 4e-4 starts both
# just above where they settled, the backoff below it. RECOVER_LR_FALLBACK where the weights are all zero.
RECOVER_LR_PER_RMS = 4e-4
RECOVER_LR_FALLBACK = 1e-4
# Probability floor for the "rest of the vocabulary" bucket, so its log stays finite.
REST_FLOOR = 1e-6


def trainable_params(model, first_layer: int = 0) -> list[torch.nn.Parameter]:
    """The parameters of decoder layers first_layer.. and of the final norm; embeddings and output head stay
    frozen (tied in small models, and 28M of SmolLM2's 135M parameters that a few thousand tokens would overfit).
    Layers before the cut compute what they computed in the original model, so leaving them frozen changes
    little and saves the backward pass through them: about twice the steps in the same time."""
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    params, seen = [], set()
    for p in list(decoder_layers(model)[first_layer:].parameters()) + list(_final_norm(model).parameters()):
        if id(p) not in frozen and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def initial_lr(params) -> float:
    """Recovery's peak learning rate for these parameters: RECOVER_LR_PER_RMS times the RMS of the matrices among
    them. Adam moves every weight by about the rate a step whatever the weight's size, so a rate that suits
    matrices of one scale is 5x too large, relatively, for matrices 5x smaller."""
    mats = [p for p in params if p.dim() >= 2] or list(params)
    with torch.no_grad():
        sq = sum(float(p.detach().float().pow(2).sum()) for p in mats)
    n = sum(p.numel() for p in mats)
    rms = math.sqrt(sq / n) if n else 0.0
    return RECOVER_LR_PER_RMS * rms if rms > 0 else RECOVER_LR_FALLBACK


def _final_norm(model) -> torch.nn.Module:
    decoder = model.get_decoder()
    return getattr(decoder, "norm", None) or torch.nn.Identity()


def kd_terms(logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest.

    logits (N, V) student; idx (N, k) token ids and logp (N, k) the teacher's log-probabilities of them
    (from its full softmax). Returns (N,) float32.
    """
    logits = logits.float()
    q_top = logits.gather(-1, idx.long()) - torch.logsumexp(logits, dim=-1, keepdim=True)
    # the student's mass outside the teacher's top-k, without a second pass over the vocabulary
    q_rest = (1 - q_top.exp().sum(-1)).clamp_min(REST_FLOOR).log()
    p_top_log = logp.float()
    p_top = p_top_log.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(REST_FLOOR)
    kl_top = (p_top * (p_top_log - q_top)).sum(-1)
    kl_rest = p_rest * (p_rest.log() - q_rest)
    return kl_top + kl_rest


def chunked_kd(model, ids: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor, backward: bool) -> float:
    """Mean KL over every position of `ids` (B, T); with backward=True, gradients are accumulated.

    The decoder runs once; the head and the loss run LOGIT_ROWS positions at a time on a detached copy of
    the last hidden state, whose gradient is then sent back through the decoder in one call.
    """
    from slimlm.evaluate import _decoder_and_head

    device = next(model.parameters()).device
    decoder, head = _decoder_and_head(model) or (model.get_decoder(), model.get_output_embeddings())
    with fast_autocast(model):
        hidden = decoder(input_ids=ids.to(device), use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    leaf = flat.detach().requires_grad_(backward)
    idx, logp = idx.reshape(-1, idx.shape[-1]).to(device), logp.detach().reshape(-1, logp.shape[-1]).to(device)
    n = flat.shape[0]
    total = 0.0
    for s in range(0, n, LOGIT_ROWS):
        with fast_autocast(model):
            logits = head(leaf[s:s + LOGIT_ROWS])
        terms = kd_terms(logits, idx[s:s + LOGIT_ROWS], logp[s:s + LOGIT_ROWS])
        loss = terms.sum() / n
        if backward:
            loss.backward()
        total += float(loss.detach())
    if backward:
        flat.backward(leaf.grad)
    return total


@torch.no_grad()
def teacher_topk(teacher, windows: torch.Tensor, k: int, batch_size: int = 4, progress: bool = True) -> dict:
    """The teacher's top-k next-token log-probabilities at every position of `windows`: {"idx", "logp"}."""
    from tqdm.auto import tqdm

    device = next(teacher.parameters()).device
    idx, logp = [], []
    for s in tqdm(range(0, len(windows), batch_size), desc="recovery: scoring with the original", unit="batch",
                  disable=not progress):
        with fast_autocast(teacher):
            logits = teacher(input_ids=windows[s:s + batch_size].to(device), use_cache=False).logits.float()
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        idx.append(top.indices.to("cpu", torch.int32))
        logp.append(top.values.to("cpu", torch.float16))
    return {"idx": torch.cat(idx), "logp": torch.cat(logp)}


@torch.no_grad()
def student_samples(model, tokenizer, n_tokens: int, seq_len: int, seed: int, progress: bool = True,
                    max_new_tokens: int = ONPOLICY_MAX_NEW_TOKENS) -> torch.Tensor:
    """On-policy text: the pruned model answers built-in instructions (batches alternate greedy and sampled at
    ONPOLICY_TEMPERATURE, no repetition penalty, so its loops show), each prompt + answer (to its end-of-turn,
    or cut by length) packed into (n, seq_len) windows."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sampler = sampling_model(model)
    max_new_tokens = max(1, min(max_new_tokens, n_tokens))
    prompts = onpolicy_prompts(tokenizer, max(64, n_tokens // 32), seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    pieces, have, start, turn = [], 0, 0, 0
    bar = tqdm(total=n_tokens, desc="recovery: pruned model answers", unit="tok", disable=not progress)
    try:
        while have < n_tokens and start < len(prompts):
            rows = min(ONPOLICY_BATCH, max(2, math.ceil((n_tokens - have) / max_new_tokens)))
            batch = prompts[start:start + rows]
            start += len(batch)
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            greedy = turn % 2 == 0
            turn += 1
            answers = generate_batch(
                sampler, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                temperature=0.0 if greedy else ONPOLICY_TEMPERATURE, top_p=0.95,
                stops=torch.tensor([eos]) if eos is not None else None,
                generator=torch.Generator(device=device).manual_seed(seed + start),
            )
            for ids, mask, answer in zip(enc["input_ids"].cpu(), enc["attention_mask"].cpu(), answers):
                pieces.append(torch.cat([ids[mask.bool()], answer]))
                have += pieces[-1].numel()
            bar.update(min(n_tokens, have) - bar.n)
    finally:
        tokenizer.padding_side = side
        bar.close()
        del sampler
    return pack_stream(pieces, seq_len)


def recover(model, teacher, tokenizer, windows: torch.Tensor, targets: dict, heldout: torch.Tensor, cfg,
            log=None, first_layer: int = 0) -> dict:
    """Distil `teacher` into `model` (in place), every decoder weight trained. Returns the history.

    windows (n, T) calibration ids with `targets` {"idx", "logp"} (n, T, k) the teacher's top-k there;
    heldout (h, T): windows for keep-best (the teacher scores them here). first_layer: the first decoder layer
    trained (0: all). cfg: CompressConfig fields
    recover_tokens (on-policy tokens to sample), recover_epochs, recover_lr, recover_minutes, recover_steps,
    kd_topk, kd_batch_tokens, seed, progress.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    k = targets["idx"].shape[-1]
    seq_len = windows.shape[1]
    data, tgt = windows, targets
    sampled = 0
    if cfg.recover_tokens > 0 and teacher is not None:
        model.eval()
        extra = student_samples(model, tokenizer, cfg.recover_tokens, seq_len, cfg.seed, progress=cfg.progress)
        if len(extra):
            extra_t = teacher_topk(teacher, extra, k, progress=cfg.progress)
            data = torch.cat([windows, extra])
            tgt = {key: torch.cat([targets[key], extra_t[key]]) for key in targets}
            sampled = int(extra.numel())
    held_t = teacher_topk(teacher, heldout, k, progress=False) if teacher is not None and len(heldout) else None
    sampling_s = time.perf_counter() - t0

    params = trainable_params(model, first_layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    batch = max(1, cfg.kd_batch_tokens // seq_len)
    steps_per_epoch = math.ceil(len(data) / batch)
    max_steps = cfg.recover_steps or steps_per_epoch * cfg.recover_epochs
    peak_lr = cfg.recover_lr or initial_lr(params)
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    plan = {"total": max_steps}
    warmup = max(1, int(0.05 * max_steps))

    def factor(step):
        total = plan["total"]
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def held_kl() -> float:
        if held_t is None:
            return float("nan")
        model.eval()
        with torch.no_grad():
            total = 0.0
            for s in range(0, len(heldout), batch):
                total += chunked_kd(model, heldout[s:s + batch], held_t["idx"][s:s + batch],
                                    held_t["logp"][s:s + batch], backward=False) * len(heldout[s:s + batch])
        return total / len(heldout)

    history = [{"step": 0, "val_kl": held_kl(), "seconds": 0.0}]
    best, best_state = history[0]["val_kl"], _snapshot(params)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    budget_s = cfg.recover_minutes * 60 if not cfg.recover_steps else math.inf
    bar = tqdm(total=max_steps, desc="recovery: distilling the whole model", unit="step", disable=not cfg.progress)
    step, run, run_n, t_train = 0, 0.0, 0, time.perf_counter()
    backoffs = 0

    def eval_every() -> int:
        return max(1, min(steps_per_epoch, plan["total"] // RECOVER_EVALS))

    try:
        while step < plan["total"]:
            perm = torch.randperm(len(data), generator=gen)
            for s in range(0, len(perm), batch):
                if step >= plan["total"]:
                    break
                rows = perm[s:s + batch]
                model.train()
                opt.zero_grad(set_to_none=True)
                loss = chunked_kd(model, data[rows], tgt["idx"][rows], tgt["logp"][rows], backward=True)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step += 1
                run += loss
                run_n += 1
                bar.update(1)
                bar.set_postfix(kl=f"{loss:.4g}")
                if step == 3 and not cfg.recover_steps:  # the time budget fixes the schedule's length
                    per_step = (time.perf_counter() - t_train) / 3
                    left = budget_s - (time.perf_counter() - t0)
                    plan["total"] = max(step, min(max_steps, step + int(left / (per_step * 1.08))))
                    bar.total = plan["total"]
                    bar.refresh()
                if step % eval_every() == 0 or step == plan["total"]:
                    v = held_kl()
                    entry = {"step": step, "train_kl": run / max(1, run_n), "val_kl": v,
                             "seconds": time.perf_counter() - t0}
                    history.append(entry)
                    if log and cfg.progress:
                        log(f"recovery step {step}/{plan['total']}: train KL {run / max(1, run_n):.4g}  "
                            f"held-out KL {v:.4g}")
                    run, run_n = 0.0, 0
                    if math.isnan(best) or v < best:
                        best, best_state = v, _snapshot(params)
                    elif backoffs < RECOVER_BACKOFFS and step < plan["total"]:
                        # worse than the best so far: back to it, at a quarter of the learning rate
                        backoffs += 1
                        _restore(params, best_state)
                        opt.state.clear()
                        sched.base_lrs = [lr * RECOVER_BACKOFF for lr in sched.base_lrs]
                        for group, lr in zip(opt.param_groups, sched.base_lrs):
                            group["lr"] = lr * factor(step)
                        entry["backoff_lr"] = sched.base_lrs[0]
                        if log and cfg.progress:
                            log(f"recovery: held-out KL rose; back to the best weights at learning rate "
                                f"{sched.base_lrs[0]:.3g}")
    finally:
        bar.close()
        _restore(params, best_state)
        for p in params:
            p.requires_grad_(False)
        model.eval()
    return {"history": history, "best_val_kl": best, "steps": step, "first_layer": first_layer, "backoffs": backoffs,
            "lr": peak_lr, "lr_rule": "given" if cfg.recover_lr else f"{RECOVER_LR_PER_RMS:g} x weight RMS",
            "final_lr": sched.base_lrs[0],
            "train_windows": int(len(data)),
            "onpolicy_tokens": sampled, "calib_tokens": int(windows.numel()), "topk": int(k),
            "trained_params": int(sum(p.numel() for p in params)), "sampling_s": sampling_s,
            "seconds": time.perf_counter() - t0}


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params, state) -> None:
    for p, s in zip(params, state):
        p.copy_(s)
