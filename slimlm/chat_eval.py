"""Chat quality as a user meets it: greedy answers to instructions, and how they end.

For every instruction of a JSONL file the model answers greedily in its chat template, up to a token budget.
Per model: the share of answers that end (the end-of-turn token within the budget), the share that end in a
repetition loop, the mean answer length, and, with a reference model (the original, before compression), the
reference's mean negative log-likelihood per token of the answers: how likely the original finds what the
compressed model says (its own answers give the baseline). A few answers are kept as examples.

An answer ends in a loop when it did not end within the budget and its tail repeats itself: either exactly (a
unit of `p` tokens at least 3 times for units shorter than `LONG_UNIT` tokens, twice for longer ones, spanning
at least `MIN_LOOP_SPAN` tokens, so "!!!" is not a loop), or nearly: at least `REPEAT_SHARE` of the 4-grams of
its last `TAIL` tokens already appeared earlier in the answer (a sentence said again with a word changed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

MIN_LOOP_SPAN = 12
LONG_UNIT = 8
MAX_UNIT = 64
TAIL = 48
REPEAT_SHARE = 0.6
EXAMPLES = 4


def load_chat(path: str, limit: int | None = None) -> list[list[dict]]:
    """Conversations from a JSONL file: each row {"instruction"|"prompt": str} (one user turn, an optional
    "system" string) or {"messages": [{"role", "content"}, ...]} ending with a user turn."""
    from slimlm.data import read_utf8

    p = Path(path).expanduser()
    if p.is_dir():
        raise SlimlmError(f"--chat {path} is a directory, not a JSONL file")
    if not p.is_file():
        raise SlimlmError(f"chat file not found: {path}")
    out = []
    for lineno, line in enumerate(read_utf8(p, "chat file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlimlmError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise SlimlmError(f"{where}: expected a JSON object")
        if "messages" in row:
            msgs = row["messages"]
            if (not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs) or msgs[-1]["role"] != "user"):
                raise SlimlmError(f"{where}: messages must be a list of {{role, content}} ending with a user turn")
            conv = [{"role": m["role"], "content": m["content"]} for m in msgs]
        else:
            text = row.get("instruction", row.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise SlimlmError(f"{where}: needs a non-empty \"instruction\" (or \"prompt\" or \"messages\")")
            conv = [{"role": "user", "content": text}]
            if isinstance(row.get("system"), str) and row["system"].strip():
                conv.insert(0, {"role": "system", "content": row["system"]})
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise SlimlmError(f"chat file {path} has no instructions")
    return out


def loop_span(tokens: list[int]) -> int:
    """Length of the repetition loop the sequence ends in (0 when it does not end in one)."""
    n = len(tokens)
    best = 0
    for p in range(1, min(MAX_UNIT, n // 2) + 1):
        k = 0  # trailing positions i with tokens[i] == tokens[i - p]
        while k < n - p and tokens[n - 1 - k] == tokens[n - 1 - k - p]:
            k += 1
        span = k + p
        repeats = span / p
        if span >= MIN_LOOP_SPAN and repeats >= (3 if p < LONG_UNIT else 2):
            best = max(best, span)
    return best


def repeated_share(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams ending in the last TAIL tokens that already occurred earlier in the sequence."""
    if len(tokens) < 2 * n:
        return 0.0
    start = max(n - 1, len(tokens) - TAIL)
    seen, hits, total = set(), 0, 0
    for i in range(n - 1, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        if i >= start:
            total += 1
            hits += gram in seen
        seen.add(gram)
    return hits / total if total else 0.0


def is_loop(answer: dict) -> bool:
    """The answer ran to the budget stuck in a repetition (see the module docstring)."""
    ids = answer["answer_ids"]
    return not answer["ended"] and (loop_span(ids) > 0 or (len(ids) >= TAIL and repeated_share(ids) >= REPEAT_SHARE))


def _prompt_ids(tokenizer, conv: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise their own errors (e.g. a system role they refuse)
            raise SlimlmError(f"the chat template refuses a conversation: {str(exc).splitlines()[0]}") from exc
    else:
        text = "\n\n".join(m["content"] for m in conv) + "\n\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _stop_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy_answers(model, tokenizer, convs: list[list[dict]], max_new_tokens: int, batch_size: int = 8,
                   progress: bool = True) -> list[dict]:
    """Greedy answers: [{"prompt_ids", "answer_ids" (without the end token), "ended"}] in input order."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stops = _stop_ids(tokenizer, model)
    prompts = [_prompt_ids(tokenizer, c) for c in convs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[dict | None] = [None] * len(prompts)
    for s in tqdm(range(0, len(order), batch_size), desc="chat: answering", unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=sorted(stops), pad_token_id=pad,
                             use_cache=True)
        for r, i in enumerate(idx):
            new = gen[r, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), None)
            out[i] = {"prompt_ids": prompts[i], "answer_ids": new if end is None else new[:end],
                      "ended": end is not None}
    return out


@torch.no_grad()
def answer_nll(model, answers: list[dict], stop_id: int | None, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per token of the answers (their end token included when they ended) under
    `model`, each given its prompt."""
    from slimlm.evaluate import next_token_logprobs

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(answers), batch_size):
        part = answers[s:s + batch_size]
        seqs = []
        for a in part:
            tail = a["answer_ids"] + ([stop_id] if a["ended"] and stop_id is not None else [])
            seqs.append((a["prompt_ids"] + tail, len(a["prompt_ids"]), len(tail)))
        seqs = [q for q in seqs if q[2] > 0]
        if not seqs:
            continue
        width = max(len(q[0]) for q in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (seq, _, _) in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        logp = next_token_logprobs(model, ids.to(device), attention_mask=mask.to(device))
        for r, (_, n_prompt, n_ans) in enumerate(seqs):
            total -= float(logp[r, n_prompt - 1:n_prompt - 1 + n_ans].sum())
            count += n_ans
    return total / count if count else math.nan


def chat_figures(answers: list[dict], tokenizer, convs: list[list[dict]]) -> dict:
    """Loop share, end share, mean length and examples of a list of answers."""
    loops = [is_loop(a) for a in answers]
    n = len(answers)
    examples = [{"instruction": convs[i][-1]["content"],
                 "answer": tokenizer.decode(answers[i]["answer_ids"], skip_special_tokens=True),
                 "ended": answers[i]["ended"], "loop": loops[i]} for i in range(min(EXAMPLES, n))]
    return {"n": n, "loop_rate": sum(loops) / n, "end_rate": sum(a["ended"] for a in answers) / n,
            "mean_tokens": sum(len(a["answer_ids"]) for a in answers) / n, "examples": examples,
            "answers": [tokenizer.decode(a["answer_ids"], skip_special_tokens=True) for a in answers]}


def evaluate_chat(model, tokenizer, convs: list[list[dict]], max_new_tokens: int, reference=None,
                  batch_size: int = 8, progress: bool = True) -> dict:
    """Chat figures of `model`; with `reference` (model, tokenizer), also the reference's own answers and the
    reference NLL per token of both sets of answers."""
    answers = greedy_answers(model, tokenizer, convs, max_new_tokens, batch_size, progress)
    out = {"max_new_tokens": max_new_tokens, **chat_figures(answers, tokenizer, convs)}
    if reference is not None:
        ref_model, ref_tok = reference
        stop = tokenizer.eos_token_id
        out["reference_nll"] = answer_nll(ref_model, answers, stop, batch_size)
        ref_answers = greedy_answers(ref_model, ref_tok, convs, max_new_tokens, batch_size, progress)
        out["reference"] = {**chat_figures(ref_answers, ref_tok, convs),
                            "reference_nll": answer_nll(ref_model, ref_answers, ref_tok.eos_token_id, batch_size)}
    return out
