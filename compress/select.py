"""Which layers to remove: layer-pair cosine similarity of hidden states over calibration tokens, or the loss of
removing each block.

One pass over the calibration windows records the hidden state entering every decoder layer (and the
last layer's output) and accumulates S[i, k] = mean over tokens of cos(h_i, h_k), where h_i enters
layer i and h_L leaves the last layer. Then

- streamline (LLM-Streamline): the block of N layers starting at j with the highest S[j, j + N];
- shortgpt (ShortGPT): Block Influence BI_i = 1 - S[i, i + 1]; the N layers with the lowest BI.

A contiguous block can also be chosen by what its removal costs (`removal_losses`, slimlm's default): the mean
KL divergence from the model's own next-token distribution on the calibration text with each block of N layers
skipped, the lowest chosen. Cosine similarity of hidden states can point far from it where the residual stream's
norm grows from layer to layer (Gemma 3: README, "A real Gemma 3").
"""

from __future__ import annotations

import math

import torch

from slimlm.data import fast_autocast
from slimlm.errors import SlimlmError
from slimlm.models import decoder_layers, family_of, get_attr

# Calibration windows `removal_losses` scores each candidate block on (one pass of the layers after the block each).
SELECT_WINDOWS = 8
# ... at every SELECT_STRIDE-th position (the output head is most of a candidate's cost where the vocabulary is large)
SELECT_STRIDE = 4


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layers of interest have run."""


def _hidden_in(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def score_layers(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                 topk: int = 0) -> tuple[torch.Tensor, dict | None]:
    """The similarity matrix, and (when topk > 0) the model's own next-token distribution on every
    calibration token, kept sparse: {"idx": (n, T, k) int32, "logp": (n, T, k) float16} of the k most
    likely tokens (the teacher of distillation). One forward pass gives both."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    n = len(layers)
    states: list[torch.Tensor | None] = [None] * (n + 1)

    def grab(i):
        def pre(module, args, kwargs):
            states[i] = torch.nn.functional.normalize(_hidden_in(args, kwargs).float(), dim=-1).cpu()
        return pre

    def last(module, args, kwargs, output):
        states[n] = torch.nn.functional.normalize(_hidden_out(output).float(), dim=-1).cpu()

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(last, with_kwargs=True))
    total = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    idx, logp = [], []
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="scoring layers", unit="batch",
                          disable=not progress):
            ids = windows[start:start + batch_size].to(device)
            if topk:
                with fast_autocast(model):
                    logits = model(input_ids=ids, use_cache=False).logits.float()
                top = torch.log_softmax(logits, dim=-1).topk(topk, dim=-1)
                idx.append(top.indices.to("cpu", torch.int32))
                logp.append(top.values.to("cpu", torch.float16))
                del logits, top
            else:
                with fast_autocast(model):
                    model.get_decoder()(input_ids=ids, use_cache=False)
            u = torch.stack(states).flatten(1, 2)  # (L+1, tokens, H), unit rows
            total += torch.einsum("ith,kth->ik", u, u).double()
            count += u.shape[1]
    finally:
        for h in handles:
            h.remove()
    teacher = {"idx": torch.cat(idx), "logp": torch.cat(logp)} if topk else None
    return (total / count).float(), teacher


def streamline_scores(sim: torch.Tensor, n_remove: int) -> list[float]:
    """score[j] = S[j, j + N] for every start j (j = 0 included for the plot; it is never chosen)."""
    n = sim.shape[0] - 1
    return [float(sim[j, j + n_remove]) for j in range(n - n_remove + 1)]


def block_influence(sim: torch.Tensor) -> list[float]:
    n = sim.shape[0] - 1
    return [1.0 - float(sim[i, i + 1]) for i in range(n)]


def choose_block(sim: torch.Tensor, n_remove: int) -> int:
    """Start of the most redundant contiguous block of n_remove layers (never starting at layer 0)."""
    scores = streamline_scores(sim, n_remove)
    return max(range(1, len(scores)), key=lambda j: scores[j])


def choose_by_loss(losses: list[float | None]) -> int:
    """Start of the block whose removal costs least (`removal_losses`; start 0 is never chosen)."""
    starts = [j for j in range(1, len(losses)) if losses[j] is not None and math.isfinite(losses[j])]
    if not starts:
        raise SlimlmError("no block of layers could be scored: every candidate removal gave a non-finite loss")
    return min(starts, key=lambda j: losses[j])


@torch.no_grad()
def removal_losses(model, windows: torch.Tensor, n_remove: int, max_windows: int = SELECT_WINDOWS,
                   batch_size: int = 2, topk: int = 64, stride: int = SELECT_STRIDE,
                   progress: bool = True) -> list[float | None]:
    """Mean KL(model || model without the block) per position of `windows` (at most `max_windows`, evenly spaced;
    every `stride`-th position), for each block of n_remove contiguous layers, by first layer; None at start 0,
    which is never removed. The full model's distribution is kept as its top-k log-probabilities plus one bucket
    for the rest (`recover.kd_terms`).

    One full pass per batch records the hidden state entering every layer; a candidate block [j, j + N) then runs
    only the layers after it, from the state that entered layer j (what removal passes on), and the output head
    only at the scored positions."""
    from tqdm.auto import tqdm

    from slimlm.compress.recover import _final_norm, kd_terms
    from slimlm.evaluate import LOGIT_ROWS, _decoder_and_head
    from slimlm.surgery import tail_layers

    parts = _decoder_and_head(model)
    if parts is None:
        raise SlimlmError("--block-choice loss needs a model of a supported family; use --block-choice cosine")
    decoder, head = parts
    layers = decoder_layers(model)
    n = len(layers)
    if len(windows) > max_windows:
        windows = windows[torch.linspace(0, len(windows) - 1, max_windows).round().long()]
    device = next(model.parameters()).device
    starts = range(1, n - n_remove + 1)
    states: list[torch.Tensor | None] = [None] * n

    def grab(i):
        def pre(module, args, kwargs):
            states[i] = _hidden_in(args, kwargs)
        return pre

    def scored(last_hidden):  # logits at every stride-th position, LOGIT_ROWS rows at a time
        flat = last_hidden[:, ::stride].reshape(-1, last_hidden.shape[-1])
        for s in range(0, len(flat), LOGIT_ROWS):
            with fast_autocast(model):
                yield head(flat[s:s + LOGIT_ROWS]).float()

    total = [0.0] * (n - n_remove + 1)
    count = 0
    bar = tqdm(total=len(windows) * len(starts), desc="scoring blocks by removal", unit="window-block",
               disable=not progress)
    try:
        for s in range(0, len(windows), batch_size):
            ids = windows[s:s + batch_size].to(device)
            # hooked for the full pass only: the candidates' passes must not overwrite the recorded states
            handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
            try:
                with fast_autocast(model):
                    full = decoder(input_ids=ids, use_cache=False).last_hidden_state
            finally:
                for h in handles:
                    h.remove()
            targets = [torch.log_softmax(c, dim=-1).topk(min(topk, c.shape[-1]), dim=-1) for c in scored(full)]
            count += sum(t.indices.shape[0] for t in targets)
            for start in starts:
                after = start + n_remove
                if after < n:
                    with tail_layers(model, after), fast_autocast(model):
                        hidden = decoder(inputs_embeds=states[start], use_cache=False).last_hidden_state
                else:  # the block ends the stack: the final norm reads what entered it
                    with fast_autocast(model):
                        hidden = _final_norm(model)(states[start])
                for chunk, top in zip(scored(hidden), targets):
                    total[start] += float(kd_terms(chunk, top.indices, top.values).double().sum())
                bar.update(len(ids))
            states = [None] * n
    finally:
        bar.close()
    return [None] + [total[j] / max(1, count) for j in starts]


def choose_shortgpt(sim: torch.Tensor, n_remove: int) -> list[int]:
    """The n_remove layers of lowest Block Influence (layer 0 excluded)."""
    bi = block_influence(sim)
    return sorted(sorted(range(1, len(bi)), key=lambda i: bi[i])[:n_remove])


@torch.no_grad()
def collect_block_io(model, windows: torch.Tensor, start: int, end: int, batch_size: int = 4,
                     max_tokens: int | None = None, keep_mlp_before: bool = False, progress: bool = True,
                     dtype: torch.dtype = torch.bfloat16) -> dict:
    """Hidden states entering layer `start` (X) and leaving layer `end - 1` (Y), per window.

    Returns {"x": (n, T, H), "y": (n, T, H)} in `dtype` on the CPU, plus "mlp": the MLP output of
    layer start-1 when keep_mlp_before. The forward stops after layer end-1 (nothing later runs).
    """
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    got: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs):
        got["x"] = _hidden_in(args, kwargs).detach().to("cpu", dtype)

    def post(module, args, kwargs, output):
        got["y"] = _hidden_out(output).detach().to("cpu", dtype)
        raise _StopForward

    def mlp_hook(module, args, output):
        got["mlp"] = output.detach().to("cpu", dtype)

    handles = [layers[start].register_forward_pre_hook(pre, with_kwargs=True),
               layers[end - 1].register_forward_hook(post, with_kwargs=True)]
    if keep_mlp_before:
        handles.append(get_attr(layers[start - 1], family_of(model).mlp).register_forward_hook(mlp_hook))
    out: dict[str, list[torch.Tensor]] = {"x": [], "y": [], "mlp": []}
    device = next(model.parameters()).device
    seen = 0
    try:
        for s in tqdm(range(0, len(windows), batch_size), desc="caching block hidden states", unit="batch",
                      disable=not progress):
            if max_tokens is not None and seen >= max_tokens:
                break
            ids = windows[s:s + batch_size].to(device)
            try:
                model.get_decoder()(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            for k in got:
                out[k].append(got[k])
            seen += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}
