"""Batched sampling for the text slimlm writes itself (self-calibration, on-policy recovery), and the nucleus
filter that serving's sampler shares.

`transformers`' `generate` spends more time choosing tokens than computing them on a CPU at batch 64 and a 49k
vocabulary: its top-p sorts every row's whole vocabulary each step and its multinomial scans all of it. Here the
nucleus is found among the top-k first (exact: k grows when some row's top-k holds less than top_p of the
mass), tokens are drawn from those k, the output head runs at the last position only, and rows that have
ended leave the batch (their cache rows are dropped) instead of computing padding until the longest row is done.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Candidates searched for the nucleus before a row falls back to sorting its whole vocabulary.
NUCLEUS_CANDIDATES = 256


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = NUCLEUS_CANDIDATES):
    """The smallest set of most likely tokens whose probability reaches top_p, per row of probs (..., V).

    Returns (ids, probs) of shape (..., k): each row's candidates in descending order with the ones outside the
    nucleus zeroed (the most likely token always stays). A token is kept when the mass strictly above it is below
    top_p. Exact for any distribution: when some row's top `candidates` hold less than top_p, more are taken (up
    to the whole vocabulary).
    """
    flat = probs.reshape(-1, probs.shape[-1])
    vocab = flat.shape[-1]
    for k in (candidates, candidates * 8, vocab):
        values, ids = torch.topk(flat, min(k, vocab), dim=-1)
        if k >= vocab or bool((values.sum(-1) >= top_p).all()):
            break  # every row's nucleus lies within its top k
    cut = (values.cumsum(-1) - values) >= top_p
    cut[:, 0] = False
    values = values.masked_fill(cut, 0.0)
    shape = (*probs.shape[:-1], values.shape[-1])
    return ids.view(shape), values.view(shape)


def sample_rows(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): argmax at temperature 0, else a draw from the tempered distribution
    restricted to its top_p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        ids, kept = nucleus(probs, top_p)
        return ids.gather(1, torch.multinomial(kept, 1, generator=generator)).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL repetition penalty (as transformers applies it): logits of seen tokens divided by the penalty
    when positive, multiplied when negative. seen: (B, V) bool."""
    return torch.where(seen, torch.where(logits >= 0, logits / penalty, logits * penalty), logits)


def repeats(run: list[int], seen: set) -> bool:
    """Whether the run of tokens `run` is in `seen` (a loop); adds it when not."""
    gram = tuple(run)
    if gram in seen:
        return True
    seen.add(gram)
    return False


@torch.no_grad()
def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                   temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   stops: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   on_step: Callable[[int], None] | None = None, loop_ngram: int = 0,
                   looped: list[bool] | None = None) -> list[torch.Tensor]:
    """Continue each left-padded row of input_ids (B, T): its new tokens, up to and including the first token
    in `stops`, or max_new_tokens of them. on_step(n) is called with the number of tokens each step wrote.
    loop_ngram n > 0: a row ends as soon as it writes a run of n tokens it wrote before, its tokens cut where
    that run began (a loop; `slimlm.data.loop_start` on the whole text gives the same cut); `looped`, a list,
    then receives for each row whether it ended so.

    Greedy (temperature 0) gives the tokens of `model.generate(do_sample=False)`.
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    grams: list[set] = [set() for _ in range(batch)]
    ended_looping = [False] * batch
    rows = torch.arange(batch)  # the input row of each row of the running batch; -1 once it has ended
    mask = attention_mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    seen = None
    if repetition_penalty != 1.0:  # transformers counts the prompt, padding included
        vocab = model.get_output_embeddings().weight.shape[0]
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.clamp(0, vocab - 1), True)
    stops = stops.to(device) if stops is not None else None
    step = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 logits_to_keep=1)
    cache, logits = step.cache, step.logits[:, -1]
    next_pos = positions[:, -1] + 1
    for i in range(max_new_tokens):
        logits = logits.float()
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        tokens = sample_rows(logits, temperature, top_p, generator)
        live = rows >= 0
        loop_rows = []
        for j, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
            if row >= 0:
                out[row].append(token)
                if loop_ngram and len(out[row]) >= loop_ngram and repeats(out[row][-loop_ngram:], grams[row]):
                    del out[row][-loop_ngram:]  # a loop: the text ends where this run first began again
                    ended_looping[row] = True
                    loop_rows.append(j)
        if on_step is not None:
            on_step(int(live.sum()))
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if stops is not None:
            rows = rows.masked_fill(torch.isin(tokens, stops).cpu(), -1)
        if loop_rows:
            rows[loop_rows] = -1
        idle = rows < 0
        if i == max_new_tokens - 1 or bool(idle.all()):
            break
        # ended rows idle (their tokens are dropped) until enough of them have ended to pay for a copy of the cache
        # without them
        if int(idle.sum()) >= max(1, len(rows) // 8):
            keep = (~idle).nonzero().squeeze(1)
            at = keep.to(device)
            cache.batch_select_indices(at)
            rows, mask, tokens, next_pos = rows[keep], mask[at], tokens[at], next_pos[at]
            seen = seen[at] if seen is not None else None
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        step = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache,
                     use_cache=True, logits_to_keep=1)
        cache, logits = step.cache, step.logits[:, -1]
        next_pos = next_pos + 1
    if looped is not None:
        looped[:] = ended_looping
    return [torch.tensor(t, dtype=torch.long) for t in out]
