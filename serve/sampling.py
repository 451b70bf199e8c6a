"""Per-request sampling: penalties, temperature, top-k, top-p, min-p, a seeded generator, logprobs.

Each running sequence owns a `Sampler`; the engine hands it that sequence's row of the batch logits.
Rows are processed one by one so that a request's choice never depends on its neighbours, and a seed
gives the same tokens every time (its own `torch.Generator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from slimlm.generate import nucleus

# OpenAI's documented ranges.
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0
# OpenAI allows 20 top logprobs in chat and 5 in completions; one cap for both.
MAX_TOP_LOGPROBS = 20
MIN_LOGPROB = -9999.0  # OpenAI's floor for a reported logprob


@dataclass
class SamplingParams:
    """How to pick the next token.

    temperature: 0 is greedy; otherwise logits are divided by it (0 < t <= 2).
    top_p: keep the smallest set of tokens whose probability reaches top_p (0 <= p <= 1; 0 keeps the most likely
        token, as OpenAI accepts it).
    top_k: keep the k most likely tokens (0 or -1: all).
    min_p: drop tokens less likely than min_p times the most likely one (0 <= p <= 1).
    presence_penalty, frequency_penalty: OpenAI's, over the generated tokens (-2..2).
    repetition_penalty: the CTRL/HF one over prompt and generated tokens (> 0 and finite, 1 is off; an
        infinite one makes 0 * inf = NaN logits).
    seed: makes sampling reproducible.
    logprobs: None for none; k >= 0 for the chosen token's logprob plus the k most likely.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        checks = [
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"between 0 and {MAX_TEMPERATURE}"),
            ("top_p", 0 <= self.top_p <= 1, "in [0, 1]"),
            ("top_k", self.top_k >= -1, "-1, 0 (off) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -MAX_PENALTY <= self.presence_penalty <= MAX_PENALTY, "between -2 and 2"),
            ("frequency_penalty", -MAX_PENALTY <= self.frequency_penalty <= MAX_PENALTY, "between -2 and 2"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "a finite number greater than 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"between 0 and {MAX_TOP_LOGPROBS}"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """The sampling state of one sequence: its generator and token counts for the penalties."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device="cpu"):
        self.p = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                self.generator.seed()
        self.counts = None  # (V,) generated-token counts, only when a penalty needs them
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        self.seen = None  # (V,) bool: prompt or generated, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab]
            if ids:
                self.seen[torch.tensor(ids, device=device)] = True

    def __call__(self, logits: torch.Tensor) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """Pick a token from one row of logits (V,): (token, its logprob, [(id, logprob)] top list)."""
        p = self.p
        logits = logits.float()
        if self.seen is not None:
            picked = logits[self.seen]
            logits = logits.clone()
            # `>= 0`: a zero logit is divided, since 0 * a penalty past float32's range (cast to inf) is NaN
            logits[self.seen] = torch.where(picked >= 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        logprobs = None
        if p.logprobs is not None:  # floored as OpenAI does: JSON has no -Infinity for a token a penalty ruled out
            logprobs = torch.log_softmax(logits, dim=-1).clamp(min=MIN_LOGPROB)
        if p.greedy:  # numpy's argmax on a CPU row: 5 us against torch's 43 for 49,152 logits (same first-max rule)
            token = int(np.argmax(logits.numpy())) if logits.device.type == "cpu" else int(torch.argmax(logits))
        else:
            token = self._sample(logits)
        self.observe(token)
        if logprobs is None:
            return token, None, None
        top = []
        if p.logprobs:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return token, float(logprobs[token]), top

    def observe(self, token: int) -> None:
        if self.counts is not None and token < self.counts.numel():
            self.counts[token] += 1
        if self.seen is not None and token < self.seen.numel():
            self.seen[token] = True

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.p
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1:  # the nucleus among the most likely tokens (the most likely one always stays)
            ids, kept = nucleus(probs, p.top_p)
            return int(ids[torch.multinomial(kept, 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def score_tokens(logits: torch.Tensor, targets: list[int], top: int) -> list[dict]:
    """Log-probabilities of known tokens: for each row of `logits` (n, V) and the token that followed it, that
    token's logprob and the `top` most likely tokens, as {"id", "logprob", "top": [(id, logprob)]} (floored at
    MIN_LOGPROB as the sampled ones are; no penalty or temperature: the model's own distribution)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=MIN_LOGPROB)  # (n, V)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).view(-1, 1)).squeeze(1).tolist()
    tops: list[list] = [[] for _ in targets]
    if top:
        values, ids = torch.topk(logprobs, top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [{"id": t, "logprob": lp, "top": tp} for t, lp, tp in zip(targets, chosen, tops)]
