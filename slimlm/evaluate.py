"""Evaluation: perplexity, zero-shot multiple choice, and stability against a reference model.

Multiple choice is scored as lm-evaluation-harness does: the context is the prompt, each choice a
continuation; `acc` takes the highest summed log-likelihood, `acc_norm` the highest log-likelihood
per character of the continuation. Stability (LLM-Streamline, arXiv 2403.19135) weighs each example
by a softmax over examples of the standard deviation of the reference's per-choice scores and sums
the weights of the examples where model and reference are both right or both wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.errors import SlimlmError


def model_device(model) -> torch.device:
    return next(model.parameters()).device


LOGIT_ROWS = 1024  # positions whose full-vocabulary logits exist at once (1024 x 49k vocab = 200 MB)


def _decoder_and_head(model):
    """The decoder and output head of a supported family (`lm_head(last hidden state)`, soft-capped where the
    family caps its logits), else None."""
    from slimlm.families import final_softcap
    from slimlm.models import FAMILIES

    if getattr(model.config, "model_type", None) not in FAMILIES:
        return None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return None
    cap = final_softcap(model)
    if cap:
        linear = head

        def head(h):
            return torch.tanh(linear(h) / cap) * cap
    return decoder, head


def next_token_logprobs(model, ids: torch.Tensor, attention_mask=None, position_ids=None,
                        argmax: bool = False):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) as (B, L - 1) float32 (and the argmax predictions when asked).

    The (B, L, vocab) logits are never held at once: the decoder's last hidden states go through the
    output head LOGIT_ROWS positions at a time, so long windows and big batches stay within memory.
    """
    targets = ids[:, 1:]
    parts = _decoder_and_head(model)
    if parts is None:
        hidden = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, :-1]
        head = torch.nn.Identity()
    else:
        decoder, head = parts
        hidden = decoder(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state[:, :-1]
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logp = torch.empty(flat_t.shape, dtype=torch.float32)
    top1 = torch.empty(flat_t.shape, dtype=torch.long) if argmax else None
    for s in range(0, len(flat_t), LOGIT_ROWS):
        logits = head(flat_h[s:s + LOGIT_ROWS]).float()
        t = flat_t[s:s + LOGIT_ROWS].to(logits.device)
        logp[s:s + LOGIT_ROWS] = -torch.nn.functional.cross_entropy(logits, t, reduction="none").cpu()
        if argmax:
            top1[s:s + LOGIT_ROWS] = logits.argmax(-1).cpu()
    logp = logp.view(targets.shape)
    return (logp, top1.view(targets.shape)) if argmax else logp


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity over (n, L) token windows; every token but each window's first is predicted."""
    from tqdm.auto import tqdm

    device = model_device(model)
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        nll -= float(next_token_logprobs(model, ids).sum())
        count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


@dataclass
class MCExample:
    context: str
    choices: list[str]
    label: int


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    n: int
    scores: list[list[float]] = field(repr=False)  # summed log-likelihood per choice
    correct: list[bool] = field(repr=False)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise SlimlmError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _label(value, where: str, letters: bool = True) -> int:
    """A label as an index: an integer, a string of one ("2"), or a letter ("B" = 1, as in ARC-style files)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip()
        if v.lstrip("-").isdigit():
            return int(v)
        if letters and len(v) == 1 and "A" <= v.upper() <= "Z":
            return ord(v.upper()) - ord("A")
    raise SlimlmError(f"{where}: label {value!r} is neither an index nor a letter")


def load_mc(path: str, limit: int | None = None) -> list[MCExample]:
    """PIQA (goal/sol1/sol2), Social IQa (context/question/answerA-C) with `-labels.lst` beside, or
    generic JSONL rows {"context", "choices", "label"} (each choice follows the context after one space,
    unless the context ends or the choice starts with whitespace)."""
    from slimlm.data import read_utf8

    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"multiple-choice file not found: {path}")
    rows = []
    for lineno, line in enumerate(read_utf8(p, "multiple-choice file").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SlimlmError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    if not rows:
        raise SlimlmError(f"multiple-choice file {path} is empty")
    labels_path = p.with_name(p.stem + "-labels.lst")
    labels = None
    if labels_path.is_file():
        try:
            labels = [int(x) for x in read_utf8(labels_path, "labels file").split()]
        except ValueError as exc:
            raise SlimlmError(f"{labels_path}: labels must be integers ({exc})") from None
        if len(labels) != len(rows):
            raise SlimlmError(f"{labels_path} has {len(labels)} labels for {len(rows)} rows")
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{path}: row {i + 1}"
        if not isinstance(row, dict):
            raise SlimlmError(f"{where} is not a JSON object")
        if "goal" in row and "sol1" in row:  # PIQA, as lm-evaluation-harness prompts it
            goal, *sols = (_text(row, k, where) for k in ("goal", "sol1", "sol2"))
            ex = MCExample(f"Question: {goal}\nAnswer:", [" " + c for c in sols],
                           labels[i] if labels else _label(row.get("label"), where))
        elif "answerA" in row:  # Social IQa; labels are 1-based
            context, question, *answers = (_text(row, k, where)
                                           for k in ("context", "question", "answerA", "answerB", "answerC"))
            ex = MCExample(f"Q: {context} {question}\nA:", [" " + a for a in answers],
                           (labels[i] if labels else _label(row.get("label"), where, letters=False)) - 1)
        elif "context" in row and "choices" in row and "label" in row:
            choices = row["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
                raise SlimlmError(f"{where}: choices must be a list of at least 2 strings")
            context = _text(row, "context", where)
            # one space between context and choice, as lm-evaluation-harness joins them, unless one is there
            sep = "" if not context or context[-1].isspace() else " "
            ex = MCExample(context, [str(c) if str(c)[:1].isspace() else sep + str(c) for c in choices],
                           _label(row["label"], where))
        else:
            raise SlimlmError(f"{where} is neither PIQA, SIQA nor {{context, choices, label}}")
        empty = [k + 1 for k, c in enumerate(ex.choices) if not c.strip()]
        if empty:
            raise SlimlmError(f"{where}: choice {empty[0]} is empty")
        if not 0 <= ex.label < len(ex.choices):
            raise SlimlmError(f"{where} has label {ex.label} for {len(ex.choices)} choices")
        out.append(ex)
    return out


@torch.no_grad()
def _loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, progress: bool, desc: str):
    """Summed log-probability of each continuation given its context (right-padded batches).

    A pair longer than the model's context (`max_position_embeddings`) loses the start of its context,
    as lm-evaluation-harness truncates it.
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    max_len = getattr(model.config, "max_position_embeddings", None) or 0
    from slimlm.data import bos_ids

    bos = bos_ids(tokenizer)  # a model whose texts begin with BOS (Gemma) scores a pair after it
    reqs = []
    for ctx, cont in pairs:
        ctx_ids = bos + tokenizer(ctx, add_special_tokens=False)["input_ids"]
        whole = bos + tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
        n_ctx = len(ctx_ids)
        # the continuation tokens are what the whole string adds after the context's tokens
        while n_ctx > 0 and whole[:n_ctx] != ctx_ids[:n_ctx]:
            n_ctx -= 1
        if n_ctx == len(whole):
            n_ctx -= 1
        if n_ctx == 0:  # empty context: condition on BOS/EOS so the first token is predicted
            whole = [tokenizer.bos_token_id or tokenizer.eos_token_id] + whole
            n_ctx = 1
        if max_len > 1 and len(whole) > max_len:
            drop = len(whole) - max_len
            whole, n_ctx = whole[drop:], max(1, n_ctx - drop)
        reqs.append((whole, n_ctx))
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    out = [0.0] * len(reqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        width = max(len(reqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(reqs[i][0])] = torch.tensor(reqs[i][0])
            mask[r, : len(reqs[i][0])] = 1
        logp = next_token_logprobs(model, ids.to(device), attention_mask=mask.to(device))
        for r, i in enumerate(idx):
            whole, n_ctx = reqs[i]
            out[i] = float(logp[r, n_ctx - 1: len(whole) - 1].sum())
    return out


def multiple_choice(model, tokenizer, examples: list[MCExample], batch_size: int = 16, progress: bool = True,
                    name: str = "mc") -> MCResult:
    pairs = [(ex.context, c) for ex in examples for c in ex.choices]
    lls = _loglikelihoods(model, tokenizer, pairs, batch_size, progress, desc=name)
    scores, correct, correct_norm, k = [], [], [], 0
    for ex in examples:
        s = lls[k:k + len(ex.choices)]
        k += len(ex.choices)
        norm = [v / max(1, len(c)) for v, c in zip(s, ex.choices)]
        scores.append(s)
        correct.append(max(range(len(s)), key=s.__getitem__) == ex.label)
        correct_norm.append(max(range(len(norm)), key=norm.__getitem__) == ex.label)
    n = len(examples)
    return MCResult(sum(correct) / n, sum(correct_norm) / n, n, scores, correct)


def stability(result: MCResult, reference: MCResult) -> float:
    """Weighted agreement (both right or both wrong) with weights softmax(std of reference scores)."""
    if result.n != reference.n:
        raise ValueError("stability needs results on the same examples")
    stds = torch.tensor([torch.tensor(s, dtype=torch.float64).std(unbiased=False).item() for s in reference.scores],
                        dtype=torch.float64)
    w = torch.softmax(stds, dim=0)
    agree = torch.tensor([a == b for a, b in zip(result.correct, reference.correct)])
    return float(w[agree].sum())


def mc_pairs(items: list[str]) -> list[tuple[str, str]]:
    """--mc NAME=FILE arguments as (name, path) pairs."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise SlimlmError(f"--mc takes NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        pairs.append((name, path))
    return pairs


@dataclass
class EvalConfig:
    """What `slimlm eval` measures.

    ppl: text file for perplexity (non-overlapping windows of seq_len tokens; the first `windows` only).
    mc: (name, path) multiple-choice sets; limit: first N examples of each.
    reference: model spec whose answers define stability (also evaluated, on the same examples), and whose
        likelihood judges the chat answers.
    chat: JSONL of instructions (see slimlm/chat_eval.py): greedy answers of the model (and of the reference),
        their loop and end shares, length, and the reference's NLL per token of them; chat_max_tokens: the
        answer budget.
    """

    ppl: str | None = None
    seq_len: int = 1024
    windows: int | None = None
    mc: list = field(default_factory=list)
    limit: int | None = None
    reference: str | None = None
    device: str | None = None
    batch_size: int = 16
    chat: str | None = None
    chat_max_tokens: int = 128
    progress: bool = True

    def __post_init__(self):
        if self.ppl is None and not self.mc and self.chat is None:
            raise SlimlmError("nothing to evaluate: give --ppl FILE, --mc NAME=FILE and/or --chat FILE")
        if self.reference and not self.mc and self.chat is None:
            raise SlimlmError("--reference needs at least one --mc set or --chat (stability and chat answers are "
                              "measured against it)")
        if self.chat_max_tokens < 1:
            raise SlimlmError(f"--chat-max-tokens must be at least 1, got {self.chat_max_tokens}")
        if self.ppl is not None and not Path(self.ppl).expanduser().is_file():
            if Path(self.ppl).expanduser().is_dir():
                raise SlimlmError(f"--ppl {self.ppl} is a directory, not a text file")
            raise SlimlmError(f"perplexity file not found: {self.ppl}")
        if self.seq_len < 2:
            raise SlimlmError("--seq-len must be at least 2")
        names = [name for name, _ in self.mc]
        if any(not name.strip() for name in names):
            raise SlimlmError("--mc takes NAME=FILE with a non-empty NAME")
        dupes = sorted({name for name in names if names.count(name) > 1})
        if dupes:
            raise SlimlmError(f"--mc names must be unique: {', '.join(dupes)} given more than once")


def evaluate_loaded(model, tokenizer, cfg: EvalConfig, sets: dict | None = None) -> dict:
    """Numbers for one loaded model; `sets` maps name -> examples (loaded once, shared with a reference)."""
    from slimlm.data import read_utf8, token_windows
    from slimlm.models import check_seq_len, count_params

    out: dict = {"params": count_params(model)}
    if cfg.ppl:
        check_seq_len(model, cfg.seq_len)
        text = read_utf8(cfg.ppl, "perplexity file")
        windows = token_windows(tokenizer, text, cfg.windows, cfg.seq_len, what=cfg.ppl)
        out["ppl"] = perplexity(model, windows, batch_size=max(1, cfg.batch_size // 4), progress=cfg.progress)
    sets = sets if sets is not None else {name: load_mc(path, cfg.limit) for name, path in cfg.mc}
    out["mc"] = {}
    for name, examples in sets.items():
        r = multiple_choice(model, tokenizer, examples, batch_size=cfg.batch_size, progress=cfg.progress, name=name)
        out["mc"][name] = {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n, "_result": r}
    return out


def evaluate_model(spec, cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Evaluate a model spec (or a loaded model) and, with cfg.reference, the reference and stability."""
    from slimlm.chat_eval import evaluate_chat, load_chat
    from slimlm.models import load_model

    sets = {name: load_mc(path, cfg.limit) for name, path in cfg.mc}
    convs = load_chat(cfg.chat, cfg.limit) if cfg.chat else None
    if model is None:
        model, tokenizer = load_model(spec, device=cfg.device)
    results = {"model": str(spec), **evaluate_loaded(model, tokenizer, cfg, sets)}
    ref_model = ref_tok = None
    if cfg.reference:
        ref_model, ref_tok = load_model(cfg.reference, device=cfg.device)
        ref = {"mc": {}}
        if sets:
            ref_cfg = EvalConfig(**{**cfg.__dict__, "ppl": None, "chat": None, "mc": cfg.mc, "reference": None})
            ref = evaluate_loaded(ref_model, ref_tok, ref_cfg, sets)
        results["reference"] = {"model": cfg.reference, "mc": {}}
        for name in sets:
            r, rr = results["mc"][name]["_result"], ref["mc"][name]["_result"]
            results["mc"][name]["stability"] = stability(r, rr)
            results["reference"]["mc"][name] = {k: v for k, v in ref["mc"][name].items() if k != "_result"}
        if convs is not None and ref_tok.get_vocab() != tokenizer.get_vocab():
            raise SlimlmError("--chat with --reference needs both models to share one tokenizer (the reference "
                              "scores the model's answer tokens)")
    if convs is not None:
        results["chat"] = evaluate_chat(model, tokenizer, convs, cfg.chat_max_tokens,
                                        reference=(ref_model, ref_tok) if ref_model is not None else None,
                                        batch_size=max(1, cfg.batch_size // 2), progress=cfg.progress)
    del ref_model
    for entry in results["mc"].values():
        entry.pop("_result", None)
    return results


def format_table(results: dict) -> str:
    rows = [("metric", "value")]
    if "ppl" in results:
        p = results["ppl"]
        rows.append((f"perplexity ({p['windows']} windows, {p['tokens']} tokens)", f"{p['ppl']:.3f}"))
    for name, m in results.get("mc", {}).items():
        rows.append((f"{name} acc (n={m['n']})", f"{m['acc']:.4f}"))
        rows.append((f"{name} acc_norm", f"{m['acc_norm']:.4f}"))
        if "stability" in m:
            ref = results["reference"]["mc"][name]
            rows.append((f"{name} stability vs reference", f"{m['stability']:.4f}"))
            rows.append((f"{name} reference acc", f"{ref['acc']:.4f}"))
    chat = results.get("chat")
    if chat:
        sides = [("", chat)] + ([("reference ", chat["reference"])] if "reference" in chat else [])
        for label, c in sides:
            rows.append((f"chat {label}answers", f"{c['n']} (budget {chat['max_new_tokens']} tokens)"))
            rows.append((f"chat {label}loop rate", f"{c['loop_rate']:.3f}"))
            rows.append((f"chat {label}end rate", f"{c['end_rate']:.3f}"))
            rows.append((f"chat {label}mean answer tokens", f"{c['mean_tokens']:.1f}"))
            if "reference_nll" in c:
                rows.append((f"chat {label}reference NLL / token", f"{c['reference_nll']:.3f}"))
    rows.append(("parameters", f"{results['params']:,}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b}" for a, b in rows]
    lines.insert(1, "-" * (width + 12))
    return "\n".join(lines)
