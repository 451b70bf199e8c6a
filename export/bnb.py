"""Weight quantization with bitsandbytes (int8, nf4, fp4) for dense and compressed models.

The model is reloaded through transformers' `BitsAndBytesConfig`, so every `nn.Linear` of the decoder,
the replacement FFN's projections included, becomes a bitsandbytes layer (CPU kernels since
bitsandbytes 0.46, CUDA otherwise). The embedding and the (tied) output head stay in full precision,
as transformers does by default. The result is saved as a Hugging Face directory whose
`config.json` carries the `quantization_config`, so `slimlm.load_model(OUT)` and plain
`AutoModelForCausalLM.from_pretrained(OUT)` both load it quantized; `slimlm.json` keeps the source
model's record (its FFN replacements among it) and adds a `quantization` section.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError, require
from slimlm.files import dir_bytes  # noqa: F401  (re-exported: its former home)
from slimlm.kernels.ffn import ModuleFFN

METHODS = ("int8", "nf4", "fp4")


@dataclass
class QuantConfig:
    """What `quantize` does.

    method: "int8" (LLM.int8 with outlier threshold 6.0), "nf4" or "fp4" (4-bit, block 64 as bitsandbytes sets).
    compute_dtype: dtype the 4-bit layers compute in ("float32" | "bfloat16" | "float16").
    double_quant: also quantize the 4-bit block scales (saves ~0.4 bit per weight).
    ppl_text: text file on which to measure perplexity before and after (None: not measured).
    ppl_windows, ppl_seq_len: how many windows of how many tokens of `ppl_text` to use.
    """

    method: str = "int8"
    compute_dtype: str = "float32"
    double_quant: bool = False
    ppl_text: str | None = None
    ppl_windows: int = 4
    ppl_seq_len: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise SlimlmError(f"unknown quantization method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise SlimlmError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if self.ppl_windows < 1 or self.ppl_seq_len < 2:
            raise SlimlmError("ppl_windows must be >= 1 and ppl_seq_len >= 2")
        if self.ppl_text is not None and not Path(self.ppl_text).expanduser().is_file():
            raise SlimlmError(f"perplexity text file not found: {self.ppl_text}")


# A replacement FFN over bitsandbytes layers is a `ModuleFFN`; `BnbFFN` is its former name.
BnbFFN = ModuleFFN


def bnb_config(cfg: QuantConfig):
    """The transformers `BitsAndBytesConfig` for a `QuantConfig`."""
    require("bitsandbytes", "quant")
    from transformers import BitsAndBytesConfig

    if cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.method,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                              bnb_4bit_use_double_quant=cfg.double_quant)


def module_bytes(model) -> int:
    """Bytes held by the parameters and buffers of a model (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    # bitsandbytes 4-bit weights keep their block scales in a quant_state beside the packed data
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


@contextlib.contextmanager
def quiet_bnb():
    """bitsandbytes' int8 path logs a warning on every call that it casts fp32 inputs to fp16: silence it here."""
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*kernels-community.*")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def hf_source(spec: str):
    """Yield a Hugging Face directory (or Hub id) for `spec`: a GGUF or alias is converted into a temp dir."""
    from slimlm.models import load_model, resolve, save_model

    kind, where = resolve(spec)
    if kind in ("dir", "hub"):
        yield str(where)
        return
    model, tok = load_model(spec)
    tmp = Path(tempfile.mkdtemp(prefix="slimlm-quant-src-"))
    try:
        save_model(model, tok, tmp / "model", report=None)
        del model
        yield str(tmp / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _perplexity(model, tokenizer, cfg: QuantConfig) -> dict:
    from slimlm.data import read_text, token_windows
    from slimlm.evaluate import perplexity
    from slimlm.models import check_seq_len

    check_seq_len(model, cfg.ppl_seq_len)
    windows = token_windows(tokenizer, read_text(cfg.ppl_text), cfg.ppl_windows, cfg.ppl_seq_len, what=cfg.ppl_text)
    with quiet_bnb():
        return perplexity(model, windows, batch_size=1, progress=False)


def quantize(spec: str, out, config: QuantConfig, overwrite: bool = False) -> dict:
    """Quantize the model `spec` (anything `load_model` takes) into the directory `out`; return the report.

    The output is written atomically: on any failure nothing is left at `out`.
    """
    from transformers import AutoModelForCausalLM

    from slimlm.env import library_versions
    from slimlm.files import atomic_dir, compat_config, write_record
    from slimlm.models import load_model

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    qconfig = bnb_config(config)
    with hf_source(spec) as src:
        dense, tokenizer = load_model(src)
        report = dict(dense.slimlm_info) if Path(src).is_dir() else {}
        if getattr(dense.config, "quantization_config", None) is not None:
            raise SlimlmError(f"{spec} is already quantized")
        before = {"disk_bytes": dir_bytes(src) if Path(src).is_dir() else None, "memory_bytes": module_bytes(dense)}
        ppl_before = _perplexity(dense, tokenizer, config) if config.ppl_text else None
        del dense
        try:
            with quiet_bnb():
                model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qconfig, dtype=torch.float32,
                                                             device_map="cuda" if torch.cuda.is_available() else "cpu")
        except (ValueError, RuntimeError, ImportError) as exc:
            raise SlimlmError(f"bitsandbytes cannot quantize {spec}: {str(exc).splitlines()[0]}") from exc
        ffn_layers = (report.get("architecture") or {}).get("ffn_layers", [])
        with atomic_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            compat_config(tmp, keep_quantization=True)  # quantization_config is what makes OUT load quantized
            del model
            report.setdefault("architecture", {})["ffn_layers"] = ffn_layers
            write_record(tmp, report)
            quantized, _ = load_model(str(tmp))
            after = {"disk_bytes": dir_bytes(tmp), "memory_bytes": module_bytes(quantized)}
            ppl_after = _perplexity(quantized, tokenizer, config) if config.ppl_text else None
            record = {
                "method": config.method, "config": asdict(config), "source_model": spec,
                "library": library_versions("bitsandbytes"),
                "before": before, "after": after,
                "memory_ratio": after["memory_bytes"] / before["memory_bytes"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if ppl_before is not None:
                record["perplexity"] = {"text": config.ppl_text, "windows": ppl_before["windows"],
                                        "seq_len": config.ppl_seq_len, "before": ppl_before["ppl"],
                                        "after": ppl_after["ppl"], "change": ppl_after["ppl"] / ppl_before["ppl"] - 1}
            report["quantization"] = record
            write_record(tmp, report)
    return report
