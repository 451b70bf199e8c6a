"""Width pruning (LLM-Pruner, arXiv 2305.11627): remove MLP channels and attention heads inside every layer.

Where depth pruning drops whole decoder layers, width pruning removes coupled structures within them:

- an MLP channel c: row c of the gate and up projections and column c of the down projection;
- a query head h: its head_dim rows of q (and of q's bias) and its head_dim columns of o;
- a key/value group j (grouped-query attention): k and v head j with every query head that reads it,
  so the model keeps a valid layout (each remaining key/value head serves the same number of query heads).

Importance is first-order Taylor, as LLM-Pruner computes it. The gradient g of the next-token loss on the
calibration windows is accumulated window by window (one window's activations in memory at a time; the sum of
the per-window gradients of loss / n is the gradient of the mean loss). Each weight element gets a salience s:

    element1  s = w * g                   (LLM-Pruner's `param_first`, its default and best; ours too)
    element2  s = w * F * w               (`param_second`: F = mean over windows of g_window**2, the Fisher
                                           diagonal standing in for the Hessian)
    mix       s = w * g - 0.5 * w * F * w (`param_mix`)
    vector    s = w * g, signed           (`vectorize`)

A member of a group (one weight matrix's rows or columns for that structure) scores, per channel, the sum over
the channel's elements of |s| (element-wise) or |sum of s| (vector-wise); biases count as elements of their row.
The members' per-channel scores are reduced across members with `reduction` (sum: LLM-Pruner's default; mean,
max, prod) and summed over the structure's channels (a head's head_dim channels; a key/value group's query rows
fold onto its head_dim positions, as LLM-Pruner aligns them). A structure's score estimates how much the loss
changes when it is removed.

How the ratio becomes a shape. `ratio` is the fraction of the model's parameters (as passed in; after any depth
pruning) to remove. The same width is removed in every layer, so the result is a plain Hugging Face model with a
smaller `intermediate_size` and head counts (and `head_dim` written explicitly, as it no longer equals
hidden_size / heads) that transformers, ONNX export and llama.cpp load unchanged. The split of that parameter
budget between MLP and attention is chosen by importance, not fixed: every shape (key/value groups removed,
query heads removed per group, MLP channels removed) within half an MLP rounding step of the budget is a
candidate, and the one whose removed structures have the least total score (over all layers) wins. Attention can
be left alone (`attention=False`). The kept MLP width is a multiple of `round_to` (32: the block length of GGUF's
Q4_0/Q8_0 and of ONNX MatMulNBits' default block, so quantized kernels see whole blocks). FFN replacement slots of
depth pruning (`FFNLayer`) have no attention; their MLP channels are pruned to the same width as every layer's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.models import FFNLayer, count_params, decoder_layers, family_of, get_attr

IMPORTANCES = ("element1", "element2", "mix", "vector")
REDUCTIONS = ("sum", "mean", "max", "prod")
# Kept MLP channels are a multiple of this: the block length of GGUF Q4_0/Q8_0 and of ONNX MatMulNBits' default.
ROUND_TO = 32


@dataclass
class _Slot:
    """One decoder layer's prunable projections (attention None for an FFN replacement slot)."""

    index: int
    mlp: torch.nn.Module
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear
    attn: torch.nn.Module | None = None
    q: torch.nn.Linear | None = None
    k: torch.nn.Linear | None = None
    v: torch.nn.Linear | None = None
    o: torch.nn.Linear | None = None

    def linears(self) -> list[torch.nn.Linear]:
        return [m for m in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down) if m is not None]


class _FusedRows(torch.nn.Module):
    """A fused projection (Phi-3's `qkv_proj`: rows q, k, v; `gate_up_proj`: rows gate, up) held as separate
    Linears while width pruning scores and cuts them; its output is theirs concatenated, as the fused one's."""

    def __init__(self, linear: torch.nn.Linear, sizes: list[int]):
        super().__init__()
        parts = []
        bias = linear.bias.detach().split(sizes) if linear.bias is not None else [None] * len(sizes)
        for w, b in zip(linear.weight.detach().split(sizes), bias):
            part = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                part.weight.copy_(w)
                if b is not None:
                    part.bias.copy_(b)
            part.weight.requires_grad_(linear.weight.requires_grad)
            parts.append(part)
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def fused(self) -> torch.nn.Linear:
        w = torch.cat([part.weight.detach() for part in self.parts])
        has_bias = self.parts[0].bias is not None
        out = torch.nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if has_bias:
                out.bias.copy_(torch.cat([part.bias.detach() for part in self.parts]))
        out.weight.requires_grad_(self.parts[0].weight.requires_grad)
        return out


@contextlib.contextmanager
def _unfused(model):
    """Within the block, the family's fused projections are `_FusedRows` (so every q/k/v and gate/up has its
    own Linear to score and cut); on leaving, each is fused again from its (possibly pruned) parts."""
    fam = family_of(model)
    heads, kv, hd = _geometry(model)
    split = []
    for layer in decoder_layers(model):
        if isinstance(layer, FFNLayer):
            continue
        for path, sizes in ((fam.attn_qkv, lambda lin: [heads * hd, kv * hd, kv * hd]),
                            (fam.mlp_gate_up, lambda lin: [lin.out_features // 2] * 2)):
            if path is None:
                continue
            owner_path, _, name = path.rpartition(".")
            owner = get_attr(layer, owner_path) if owner_path else layer
            linear = getattr(owner, name)
            if isinstance(linear, _FusedRows):  # nested use: the outer block re-fuses
                continue
            if type(linear) is not torch.nn.Linear:
                raise SlimlmError("width pruning needs full-precision linear layers; this model is quantized")
            setattr(owner, name, _FusedRows(linear, sizes(linear)))
            split.append((owner, name))
    try:
        yield
    finally:
        for owner, name in split:
            setattr(owner, name, getattr(owner, name).fused())


def _slots(model) -> list[_Slot]:
    """Every layer's prunable projections, refusing layouts this module cannot cut. A family's fused projections
    must be split first (`_unfused`)."""
    fam = family_of(model)
    slots = []
    for i, layer in enumerate(decoder_layers(model)):
        if isinstance(layer, FFNLayer):
            ffn = layer.ffn
            slot = _Slot(i, ffn, ffn.gate_proj, ffn.up_proj, ffn.down_proj)
        else:
            if fam.mlp_gate_up is not None:
                gate, up = _split_parts(get_attr(layer, fam.mlp_gate_up))
            else:
                gate, up = get_attr(layer, fam.mlp_gate), get_attr(layer, fam.mlp_up)
            if fam.attn_qkv is not None:
                q, k, v = _split_parts(get_attr(layer, fam.attn_qkv))
            else:
                q, k, v = (get_attr(layer, path) for path in (fam.attn_q, fam.attn_k, fam.attn_v))
            slot = _Slot(i, get_attr(layer, fam.mlp), gate, up, get_attr(layer, fam.mlp_down),
                         get_attr(layer, fam.attn), q, k, v, get_attr(layer, fam.attn_out))
        if any(type(m) is not torch.nn.Linear for m in slot.linears()):
            raise SlimlmError(f"width pruning needs full-precision linear layers; layer {i} is quantized")
        slots.append(slot)
    return slots


def _split_parts(module) -> list[torch.nn.Linear]:
    if not isinstance(module, _FusedRows):
        raise SlimlmError("width pruning of a fused projection runs within _unfused(model)")
    return list(module.parts)


def _geometry(model) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of the model's attention."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


# --------------------------------------------------------------------------------------------------
# Gradients and importance


def taylor_gradients(model, windows: torch.Tensor, second_order: bool = False, batch_size: int = 1,
                     progress: bool = True) -> tuple[dict, dict | None]:
    """The gradient of the mean next-token loss over `windows` for every prunable projection parameter, and
    (second_order) the mean over windows of each window's squared gradient. Float32 on the model's device.

    Windows run `batch_size` at a time (one at a time for second order, which needs per-window gradients);
    only the prunable projections take gradients, and the model's requires_grad flags are restored after."""
    from tqdm.auto import tqdm

    from slimlm.data import fast_autocast

    params = [p for slot in _slots(model) for m in slot.linears() for p in m.parameters()]
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    grads = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params} if second_order else None
    n = len(windows)
    step = 1 if second_order else max(1, batch_size)
    device = next(model.parameters()).device
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with torch.enable_grad():
            for s in tqdm(range(0, n, step), desc="width pruning: gradients", unit="window" if step == 1 else "batch",
                          disable=not progress):
                ids = windows[s:s + step].to(device)
                with fast_autocast(model):
                    logits = model(input_ids=ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                (loss * (len(ids) / n)).backward()
                del logits, loss
                for p in params:
                    g = p.grad.float()
                    grads[p] += g
                    if fisher is not None:
                        fisher[p] += (g * n).square() / n  # g * n: this window's own gradient
                    p.grad = None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return grads, fisher


def _salience(p: torch.Tensor, grads: dict, fisher: dict | None, importance: str) -> torch.Tensor:
    w = p.detach().float()
    if importance == "element2":
        return w * fisher[p] * w
    first = w * grads[p]
    if importance == "mix":
        return first - 0.5 * w * fisher[p] * w
    return first


def _rows(linear, grads, fisher, importance) -> torch.Tensor:
    """Per output row: sum of |s| over the row (element-wise) or |sum of s| (vector-wise), bias included."""
    s = _salience(linear.weight, grads, fisher, importance)
    b = _salience(linear.bias, grads, fisher, importance) if linear.bias is not None else None
    if importance == "vector":
        return (s.sum(1) + (b if b is not None else 0)).abs()
    return s.abs().sum(1) + (b.abs() if b is not None else 0)


def _cols(linear, grads, fisher, importance) -> torch.Tensor:
    """Per input column, as `_rows` (a bias belongs to an output row, so never to a column)."""
    s = _salience(linear.weight, grads, fisher, importance)
    return s.sum(0).abs() if importance == "vector" else s.abs().sum(0)


def _reduce(members: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Reduce per-channel scores of a group's members (stacked on a new first axis)."""
    x = torch.stack(members).double()
    if reduction == "sum":
        return x.sum(0)
    if reduction == "mean":
        return x.mean(0)
    if reduction == "max":
        return x.max(0).values
    return x.prod(0)


@dataclass
class LayerScores:
    """One layer's structure scores: MLP channels (I,), query heads (kv, rep) and key/value groups (kv,)."""

    mlp: torch.Tensor
    heads: torch.Tensor | None = None
    groups: torch.Tensor | None = None


def structure_scores(model, grads: dict, fisher: dict | None = None, importance: str = "element1",
                     reduction: str = "sum") -> list[LayerScores]:
    """Every layer's structure scores from the gradients (see the module docstring)."""
    heads, kv, hd = _geometry(model)
    rep = heads // kv
    out = []
    with torch.no_grad():
        for slot in _slots(model):
            args = (grads, fisher, importance)
            mlp = _reduce([_rows(slot.gate, *args), _rows(slot.up, *args), _cols(slot.down, *args)], reduction)
            if slot.attn is None:
                out.append(LayerScores(mlp.cpu()))
                continue
            q = _rows(slot.q, *args).view(kv, rep, hd)
            o = _cols(slot.o, *args).view(kv, rep, hd)
            k = _rows(slot.k, *args).view(kv, hd)
            v = _rows(slot.v, *args).view(kv, hd)
            head = _reduce([q, o], reduction).sum(-1)  # (kv, rep)
            group = _reduce([q.sum(1), k, v, o.sum(1)], reduction).sum(-1)  # (kv,): query rows fold onto head_dim
            out.append(LayerScores(mlp.cpu(), head.cpu(), group.cpu()))
    return out


# --------------------------------------------------------------------------------------------------
# Choosing the shape


def _unit_params(model, slots: list[_Slot]) -> tuple[int, int, int]:
    """Parameters per MLP channel, per query head and per key/value head (weights and biases) of one layer."""
    s = slots[0]
    bias = lambda m: 1 if m.bias is not None else 0  # noqa: E731
    mlp = s.gate.in_features + bias(s.gate) + s.up.in_features + bias(s.up) + s.down.out_features
    att = next((x for x in slots if x.attn is not None), None)
    if att is None:
        return mlp, 0, 0
    _, _, hd = _geometry(model)
    q_head = hd * (att.q.in_features + bias(att.q)) + hd * att.o.out_features
    kv_head = hd * (att.k.in_features + bias(att.k)) + hd * (att.v.in_features + bias(att.v))
    return mlp, q_head, kv_head


def _lowest(x: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n lowest entries (ties: the lower index first)."""
    return torch.sort(x, stable=True).indices[:n]


def _space(model, round_to: int, attention: bool) -> dict:
    """The shapes width pruning can reach: per-layer unit sizes, the kept MLP widths and head choices allowed."""
    if round_to < 1:
        raise SlimlmError(f"round_to must be at least 1, got {round_to}")
    slots = _slots(model)
    heads, kv, _ = _geometry(model)
    rep = heads // kv
    inter = slots[0].gate.out_features
    mlp_unit, q_unit, kv_unit = _unit_params(model, slots)
    n_mlp, n_attn = len(slots), sum(s.attn is not None for s in slots)
    heads_too = attention and n_attn > 0
    return {"slots": slots, "heads": heads, "kv": kv, "rep": rep, "inter": inter, "n_mlp": n_mlp, "n_attn": n_attn,
            "kept_mlp": sorted({*range(round_to, inter + 1, round_to), inter}),
            "attn_choices": [(g, r) for g in range(kv if heads_too else 1) for r in range(rep if heads_too else 1)],
            "mlp_unit": mlp_unit, "q_unit": q_unit, "kv_unit": kv_unit, "step": round_to * mlp_unit * n_mlp}


def _removed(sp: dict, g: int, r: int, keep_mlp: int) -> int:
    """Parameters removed by dropping g key/value groups, r query heads per kept group and MLP down to keep_mlp."""
    kept_heads = (sp["kv"] - g) * (sp["rep"] - r)
    attn = sp["n_attn"] * ((sp["heads"] - kept_heads) * sp["q_unit"] + g * sp["kv_unit"])
    return attn + (sp["inter"] - keep_mlp) * sp["mlp_unit"] * sp["n_mlp"]


def check_width(model, ratio: float, round_to: int = ROUND_TO, attention: bool = True) -> int:
    """Refuse a ratio width pruning cannot reach (before any gradient is computed); the parameters to remove."""
    if not 0 < ratio < 1:
        raise SlimlmError(f"--width-ratio must be in (0, 1), got {ratio}")
    with _unfused(model):
        sp = _space(model, round_to, attention)
    total = count_params(model)
    target = round(ratio * total)
    sizes = [_removed(sp, g, r, keep) for g, r in sp["attn_choices"] for keep in sp["kept_mlp"]]
    biggest, smallest = max(sizes), min(x for x in sizes + [sp["step"]] if x > 0)
    if target > biggest + sp["step"] / 2:
        raise SlimlmError(f"--width-ratio {ratio} is too large: width pruning can remove at most {biggest / total:.3f} "
                          f"of the parameters (one key/value head, one query head per key/value head and "
                          f"{sp['kept_mlp'][0]} MLP channels are kept in each layer)")
    if target < smallest / 2:
        raise SlimlmError(f"--width-ratio {ratio} is too small: the smallest width step removes "
                          f"{smallest / total:.4f} of the parameters")
    return target


def plan_width(model, scores: list[LayerScores], ratio: float, round_to: int = ROUND_TO,
               attention: bool = True) -> dict:
    """The shape to prune to and what each layer removes: among the shapes within half an MLP rounding step of
    removing `ratio` of the parameters (or the closest one), the one whose removed structures score least."""
    target = check_width(model, ratio, round_to, attention)
    sp = _space(model, round_to, attention)
    slots, kv, inter, rep = sp["slots"], sp["kv"], sp["inter"], sp["rep"]
    mlp_cost = [torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(sc.mlp).values.cumsum(0)])
                for sc in scores]  # mlp_cost[layer][k]: the k lowest channels' score
    candidates = []
    for g, r in sp["attn_choices"]:
        acost = 0.0  # score of the attention structures removed, over layers
        for sc in scores:
            if sc.groups is not None and (g or r):
                drop = set(_lowest(sc.groups, g).tolist())
                keep = [j for j in range(kv) if j not in drop]
                acost += float(sc.groups[sorted(drop)].sum()) + float(sc.heads[keep].sort(dim=1).values[:, :r].sum())
        for keep_mlp in sp["kept_mlp"]:
            removed = _removed(sp, g, r, keep_mlp)
            if removed:
                candidates.append({"kv_groups_removed": g, "q_heads_removed_per_group": r,
                                   "mlp_channels_removed": inter - keep_mlp, "params_removed": removed,
                                   "score": acost + sum(float(c[inter - keep_mlp]) for c in mlp_cost),
                                   "error": abs(removed - target)})
    close = [c for c in candidates if c["error"] <= sp["step"] / 2] or [min(candidates, key=lambda c: c["error"])]
    best = min(close, key=lambda c: (c["score"], c["error"]))
    g, r, k = best["kv_groups_removed"], best["q_heads_removed_per_group"], best["mlp_channels_removed"]
    layers = []
    for slot, sc in zip(slots, scores):
        entry = {"layer": slot.index, "mlp_channels_removed": sorted(_lowest(sc.mlp, k).tolist())}
        if sc.groups is not None:
            drop = sorted(_lowest(sc.groups, g).tolist())
            heads_out = [j * rep + h for j in range(kv) if j not in drop
                         for h in _lowest(sc.heads[j], r).tolist()]
            entry.update(kv_heads_removed=drop,
                         q_heads_removed=sorted([j * rep + h for j in drop for h in range(rep)] + heads_out))
        layers.append(entry)
    return {"choice": {k_: best[k_] for k_ in ("kv_groups_removed", "q_heads_removed_per_group",
                                               "mlp_channels_removed", "params_removed", "score")},
            "target_params_removed": target, "candidates_considered": len(close), "layers": layers,
            "alternatives": sorted(close, key=lambda c: c["score"])[:8]}


# --------------------------------------------------------------------------------------------------
# Surgery


def _cut(linear: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """A new Linear holding only the given rows (outputs) and columns (inputs) of `linear`."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows.to(w.device)]
        b = b[rows.to(w.device)] if b is not None else None
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _swap(root: torch.nn.Module, old: torch.nn.Linear, new: torch.nn.Linear) -> None:
    """Put `new` where `old` is, anywhere below `root` (a slot's MLP or FFN, its attention, a fused projection's
    parts)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError("the projection to replace is not below its layer")


def _keep(n: int, removed) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def apply_width(model, layers: list[dict]) -> None:
    """Remove, layer by layer, the MLP channels, key/value heads and query heads the plan names (every layer
    the same counts), then write the new shape into the config."""
    heads, kv, hd = _geometry(model)
    rep = heads // kv
    slots = _slots(model)
    if len(layers) != len(slots) or len({len(e["mlp_channels_removed"]) for e in layers}) != 1:
        raise ValueError("a width plan names every layer and removes the same MLP width in each")
    new_heads = new_kv = None
    new_inter = slots[0].gate.out_features - len(layers[0]["mlp_channels_removed"])
    for slot, entry in zip(slots, layers):
        keep = _keep(slot.gate.out_features, entry["mlp_channels_removed"])
        for lin, rows, cols in ((slot.gate, keep, None), (slot.up, keep, None), (slot.down, None, keep)):
            _swap(slot.mlp, lin, _cut(lin, rows, cols))
        if hasattr(slot.mlp, "intermediate_size"):
            slot.mlp.intermediate_size = len(keep)
        if slot.attn is None:
            continue
        q_keep = _keep(heads, entry["q_heads_removed"])
        kv_keep = _keep(kv, entry["kv_heads_removed"])
        groups = [[int(h) for h in q_keep if h // rep == j] for j in kv_keep.tolist()]
        if len({len(g) for g in groups}) != 1 or not groups[0]:
            raise ValueError(f"layer {slot.index}: every kept key/value head must keep the same number of query heads")
        if new_heads is not None and (new_heads, new_kv) != (len(q_keep), len(kv_keep)):
            raise ValueError("a width plan removes the same heads count in every layer")
        new_heads, new_kv = len(q_keep), len(kv_keep)
        q_rows = (q_keep[:, None] * hd + torch.arange(hd)).flatten()  # ascending: grouped by key/value head
        kv_rows = (kv_keep[:, None] * hd + torch.arange(hd)).flatten()
        for lin, rows, cols in ((slot.q, q_rows, None), (slot.k, kv_rows, None), (slot.v, kv_rows, None),
                                (slot.o, None, q_rows)):
            _swap(slot.attn, lin, _cut(lin, rows, cols))
        slot.attn.num_key_value_groups = new_heads // new_kv
        for name, value in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
            if isinstance(getattr(slot.attn, name, None), int):
                setattr(slot.attn, name, value)
    cfg = model.config
    cfg.intermediate_size = new_inter
    cfg.head_dim = hd  # explicit: hidden_size / heads no longer gives it
    if new_heads is not None:
        cfg.num_attention_heads, cfg.num_key_value_heads = new_heads, new_kv


def prune_width(model, windows: torch.Tensor, ratio: float, *, importance: str = "element1",
                reduction: str = "sum", round_to: int = ROUND_TO, attention: bool = True, batch_size: int = 1,
                progress: bool = True) -> dict:
    """Width-prune `model` in place: remove `ratio` of its parameters as MLP channels and attention heads of least
    Taylor importance on the calibration `windows` ((n, T) token ids), the same width in every layer. Returns
    the report (the shape before and after, what each layer removed, the choice and its alternatives)."""
    if importance not in IMPORTANCES:
        raise SlimlmError(f"unknown importance {importance!r}: use one of {', '.join(IMPORTANCES)}")
    if reduction not in REDUCTIONS:
        raise SlimlmError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
    if len(windows) == 0 or windows.shape[1] < 2:
        raise SlimlmError("width pruning needs at least one calibration window of two or more tokens")
    check_width(model, ratio, round_to, attention)  # refuse a bad ratio or layout before any gradient
    t0 = time.perf_counter()

    def shape():
        heads, kv, hd = _geometry(model)
        return {"intermediate_size": model.config.intermediate_size, "num_attention_heads": heads,
                "num_key_value_heads": kv, "head_dim": hd, "params": count_params(model)}

    before = shape()
    with _unfused(model):
        grads, fisher = taylor_gradients(model, windows, second_order=importance in ("element2", "mix"),
                                         batch_size=batch_size, progress=progress)
        t_grad = time.perf_counter() - t0
        scores = structure_scores(model, grads, fisher, importance, reduction)
        del grads, fisher
        plan = plan_width(model, scores, ratio, round_to=round_to, attention=attention)
        apply_width(model, plan["layers"])
    return {"ratio": ratio, "importance": importance, "reduction": reduction, "round_to": round_to,
            "attention": attention, "windows": len(windows), "tokens": int(windows.numel()),
            "before": before, "after": shape(), **plan,
            "timings": {"gradients_s": t_grad, "total_s": time.perf_counter() - t0}}
