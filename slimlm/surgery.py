"""Layer surgery: the FFN replacement slot, removing and replacing decoder layers, running a tail of the stack.

`FFNLayer` is the slot a replacement FFN takes in the decoder stack; `to_lean_ffn` and
`ffn_to_decoder_layer` convert between it and the plain-transformers form it is saved in (a decoder layer
whose attention output projection is zero). `replace_layers` deletes layers (keeping the config's per-layer
lists in step), `tail_layers` runs only the layers from one index on. Paths come from `slimlm.families`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch

from slimlm.errors import SlimlmError
from slimlm.families import decoder_layers, family_of, get_attr


class FFNLayer(torch.nn.Module):
    """A decoder-layer slot holding only the replacement FFN: y = x + mlp(norm(x)) (and, in families that norm a
    block's output, y = x + out_norm(mlp(norm(x)))).

    It takes the decoder layer's call signature and ignores attention arguments.
    """

    def __init__(self, ffn, layer_idx: int):
        super().__init__()
        self.ffn = ffn
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        return self.ffn(hidden_states)


class BlockFFN(torch.nn.Module):
    """The FFN slot of a family whose MLP block is not the gated-SiLU pre-norm block `FusedFFN` computes (Gemma:
    GELU, norms that scale by 1 + weight, a norm on the block's output): the family's own modules, copied from a
    decoder layer, computing x + out_norm(mlp(norm(x))). So the slot is exactly that layer's MLP half, and the
    saved decoder layer with zero attention output computes the same function in plain transformers (its
    attention output norm maps the zero attention output to zero)."""

    def __init__(self, norm: torch.nn.Module, mlp: torch.nn.Module, out_norm: torch.nn.Module | None,
                 hidden_size: int | None = None):
        super().__init__()
        self.norm, self.mlp, self.out_norm = norm, mlp, out_norm
        self.hidden_size = int(hidden_size or self.mlp.down_proj.weight.shape[0])

    # the projections by the names width pruning and the other stages use for a slot's MLP
    @property
    def gate_proj(self):
        return self.mlp.gate_proj

    @property
    def up_proj(self):
        return self.mlp.up_proj

    @property
    def down_proj(self):
        return self.mlp.down_proj

    def forward(self, x):
        y = self.mlp(self.norm(x))
        return x + (y if self.out_norm is None else self.out_norm(y))


def _activation(config) -> str | None:
    return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)


def lean_ffn_fits(model) -> bool:
    """Whether the family's MLP block is the gated-SiLU pre-norm block `FusedFFN` (and its Triton kernel)
    computes: no norm on the block's output, a plain RMSNorm, SiLU. Otherwise the slot is a `BlockFFN`."""
    fam = family_of(model)
    return fam.mlp_out_norm is None and fam.norm_offset == 0.0 and _activation(model.config) == "silu"


def mlp_weights(layer, fam) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights of a decoder layer's gated MLP, a fused gate_up projection split (rows gate,
    then up)."""
    if fam.mlp_gate_up is not None:
        gate, up = get_attr(layer, fam.mlp_gate_up).weight.chunk(2, dim=0)
    else:
        gate, up = get_attr(layer, fam.mlp_gate).weight, get_attr(layer, fam.mlp_up).weight
    return gate, up, get_attr(layer, fam.mlp_down).weight


def make_ffn(config, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm: torch.Tensor | None = None):
    """A FusedFFN of the model's MLP shape, initialised from the given weights (copied)."""
    from slimlm.kernels.ffn import FusedFFN

    ffn = FusedFFN(up.shape[1], up.shape[0], eps=float(config.rms_norm_eps))
    with torch.no_grad():
        ffn.gate_proj.weight.copy_(gate)
        ffn.up_proj.weight.copy_(up)
        ffn.down_proj.weight.copy_(down)
        if norm is not None:
            ffn.norm_weight.copy_(norm)
    return ffn.to(dtype=up.dtype, device=up.device)


def ffn_from_layer(model, layer) -> torch.nn.Module:
    """An FFN slot's module initialised from (a copy of) decoder layer `layer`'s MLP half."""
    fam = family_of(model)
    if lean_ffn_fits(model):
        gate, up, down = mlp_weights(layer, fam)
        return make_ffn(model.config, gate, up, down, get_attr(layer, fam.mlp_norm).weight)
    out_norm = copy.deepcopy(get_attr(layer, fam.mlp_out_norm)) if fam.mlp_out_norm else None
    return BlockFFN(copy.deepcopy(get_attr(layer, fam.mlp_norm)), copy.deepcopy(get_attr(layer, fam.mlp)), out_norm)


def to_lean_ffn(model, idx: int) -> None:
    """Turn layer `idx` (a saved FFN slot: zero attention output) back into an `FFNLayer` in place."""
    fam = family_of(model)
    layers = decoder_layers(model)
    layer = layers[idx]
    mlp_in = get_attr(layer, fam.mlp_gate_up or fam.mlp_gate)
    if type(mlp_in) is not torch.nn.Linear:  # quantized (bitsandbytes): keep its modules
        from slimlm.kernels.ffn import ModuleFFN

        if fam.mlp_gate_up is not None or not lean_ffn_fits(model):  # the family's own (quantized) modules
            out_norm = get_attr(layer, fam.mlp_out_norm) if fam.mlp_out_norm else None
            layers[idx] = FFNLayer(BlockFFN(get_attr(layer, fam.mlp_norm), get_attr(layer, fam.mlp), out_norm,
                                            hidden_size=model.config.hidden_size), idx)
            return
        norm = get_attr(layer, fam.mlp_norm).weight
        ffn = ModuleFFN(norm, get_attr(layer, fam.mlp_gate), get_attr(layer, fam.mlp_up), get_attr(layer, fam.mlp_down),
                        eps=float(model.config.rms_norm_eps))
        layers[idx] = FFNLayer(ffn, idx)
        return
    if float(get_attr(layer, fam.attn_out).weight.detach().abs().max()) != 0.0:
        raise SlimlmError(f"layer {idx} is recorded as an FFN replacement but its attention output is not zero")
    if lean_ffn_fits(model):
        layers[idx] = FFNLayer(ffn_from_layer(model, layer), idx)
        return
    out_norm = get_attr(layer, fam.mlp_out_norm) if fam.mlp_out_norm else None
    layers[idx] = FFNLayer(BlockFFN(get_attr(layer, fam.mlp_norm), get_attr(layer, fam.mlp), out_norm), idx)


def ffn_to_decoder_layer(model, slot: FFNLayer, template_idx: int):
    """The plain-transformers form of an FFN slot: a decoder layer with zero attention output."""
    fam = family_of(model)
    layers = decoder_layers(model)
    template = layers[template_idx]
    layer = type(template)(model.config, slot.layer_idx)
    layer.load_state_dict(template.state_dict())
    ffn = slot.ffn
    weight = ffn.up_proj.weight
    with torch.no_grad():
        get_attr(layer, fam.attn_out).weight.zero_()
        if getattr(get_attr(layer, fam.attn_out), "bias", None) is not None:
            get_attr(layer, fam.attn_out).bias.zero_()
        if isinstance(ffn, BlockFFN):
            get_attr(layer, fam.mlp).load_state_dict(ffn.mlp.state_dict())
            get_attr(layer, fam.mlp_norm).load_state_dict(ffn.norm.state_dict())
            if fam.mlp_out_norm:
                get_attr(layer, fam.mlp_out_norm).load_state_dict(ffn.out_norm.state_dict())
        else:
            if fam.mlp_gate_up is not None:
                fused = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], dim=0)
                _resize_linear(get_attr(layer, fam.mlp_gate_up), fused)
            else:
                _resize_linear(get_attr(layer, fam.mlp_gate), ffn.gate_proj.weight)
                _resize_linear(get_attr(layer, fam.mlp_up), ffn.up_proj.weight)
            _resize_linear(get_attr(layer, fam.mlp_down), ffn.down_proj.weight)
            get_attr(layer, fam.mlp_norm).weight.copy_(ffn.norm_weight)
    return layer.to(device=weight.device, dtype=weight.dtype)


def _resize_linear(linear: torch.nn.Linear, weight: torch.Tensor) -> None:
    """Copy `weight` into `linear`, taking its shape (a width-pruned slot is narrower than a fresh layer)."""
    if linear.weight.shape != weight.shape:
        linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    else:
        linear.weight.copy_(weight)


def set_ffn_impl(model, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "impl") and hasattr(module, "last_impl"):
            module.impl = impl


def ffn_paths(model) -> list[str]:
    """The path each FFN replacement takes for an inference call on the model's device: "triton" or
    "reference" as `FusedFFN.path_for` decides it (device, dtype, triton installed, GPU generation), "modules"
    for a `BlockFFN` (the family's own norm and MLP modules)."""
    out = []
    for layer in decoder_layers(model):
        if not isinstance(layer, FFNLayer):
            continue
        module = layer.ffn
        if not hasattr(module, "path_for"):
            out.append("modules")
            continue
        probe = torch.empty(1, module.hidden_size, device=module.up_proj.weight.device, dtype=module.norm_weight.dtype)
        with torch.no_grad():
            out.append(module.path_for(probe))
    return out


def _per_layer_lists(model) -> dict[str, list]:
    """The config lists with one entry per layer that this model has (`Family.per_layer_config`)."""
    n = len(decoder_layers(model))
    out = {}
    for name in family_of(model).per_layer_config:
        value = getattr(model.config, name, None)
        if value and len(value) == n:
            out[name] = list(value)
    return out


def replace_layers(model, remove: list[int], replacement: torch.nn.Module | None = None) -> None:
    """Delete the decoder layers `remove`; put `replacement` (if any) where the first of them was.

    Re-numbers every remaining layer's cache index and updates the config (layer count, and every per-layer
    list of `Family.per_layer_config`, such as `layer_types`: the entries of the layers kept, in order).
    """
    layers = decoder_layers(model)
    n = len(layers)
    remove = sorted(set(remove))
    if not remove or remove[0] < 0 or remove[-1] >= n:
        raise ValueError(f"layers to remove {remove} out of range for {n} layers")
    lists = _per_layer_lists(model)
    kept = [i for i in range(n) if i not in remove or (replacement is not None and i == remove[0])]
    new_layers = [replacement if i in remove else layers[i] for i in kept]
    for idx, layer in enumerate(new_layers):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = idx
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = idx
    setattr(*_layers_owner(model), torch.nn.ModuleList(new_layers))
    model.config.num_hidden_layers = len(new_layers)
    for name, values in lists.items():
        setattr(model.config, name, [values[i] for i in kept])
    if hasattr(model.config, "max_window_layers") and getattr(model.config, "max_window_layers", None):
        model.config.max_window_layers = min(model.config.max_window_layers, len(new_layers))


@contextlib.contextmanager
def tail_layers(model, start: int):
    """Within the block, the model's decoder stack is only layers[start:] (so a forward fed with
    `inputs_embeds` = the hidden states entering layer `start` runs just the rest of the model)."""
    owner, name = _layers_owner(model)
    full = getattr(owner, name)
    lists = {key: getattr(model.config, key) for key in _per_layer_lists(model)}
    setattr(owner, name, torch.nn.ModuleList(list(full)[start:]))
    for key, values in lists.items():
        setattr(model.config, key, list(values)[start:])
    try:
        yield
    finally:
        setattr(owner, name, full)
        for key, values in lists.items():
            setattr(model.config, key, values)


def _layers_owner(model):
    path = family_of(model).layers.split(".")
    return get_attr(model, ".".join(path[:-1])), path[-1]


@functools.cache
def _cache_arg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(module, cache) -> dict:
    """`{name: cache}` for `module`'s forward. transformers 5.24 renamed the KV-cache argument of models and
    decoder layers `past_key_values` -> `cache` (the old name warns until 5.40, then is gone); earlier 5.x
    releases know only `past_key_values`."""
    return {_cache_arg(type(module)): cache}


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
