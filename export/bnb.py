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
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimlm.errors import SlimlmError, require

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


def _fused_ffn_class():
    from slimlm.kernels.ffn import FusedFFN

    return FusedFFN


class BnbFFN(_fused_ffn_class()):
    """A replacement FFN whose gate/up/down projections are bitsandbytes layers.

    It keeps the `FusedFFN` attributes (norm_weight, gate_proj, up_proj, down_proj, eps, impl) and computes the
    reference formula by calling the quantized modules (their packed weights cannot go through `F.linear`).
    """

    @classmethod
    def from_layer(cls, model, layer) -> BnbFFN:
        """Take the quantized MLP and post-attention norm of a zero-attention decoder layer as they are."""
        from slimlm.models import family_of, get_attr

        fam = family_of(model)
        norm = get_attr(layer, fam.post_attn_norm).weight
        up = get_attr(layer, fam.mlp_up)
        ffn = cls(norm.shape[0], up.out_features, eps=float(model.config.rms_norm_eps))
        ffn.norm_weight = torch.nn.Parameter(norm.detach(), requires_grad=False)
        ffn.gate_proj, ffn.up_proj, ffn.down_proj = get_attr(layer, fam.mlp_gate), up, get_attr(layer, fam.mlp_down)
        return ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        self.last_impl = "reference"
        h = x.float()
        n = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(n)) * self.up_proj(n))


def bnb_config(cfg: QuantConfig):
    """The transformers `BitsAndBytesConfig` for a `QuantConfig`."""
    require("bitsandbytes", "quant")
    from transformers import BitsAndBytesConfig

    if cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.method,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                              bnb_4bit_use_double_quant=cfg.double_quant)


def dir_bytes(path) -> int:
    """Size on disk of the weight files of a model directory (safetensors, bin, onnx and external data)."""
    path = Path(path)
    suffixes = (".safetensors", ".bin", ".onnx", ".data", ".onnx_data")
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(suffixes))


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

    from slimlm.models import SLIMLM_JSON, _compat_config, atomic_dir, load_model

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
            qc = json.loads((tmp / "config.json").read_text()).get("quantization_config")
            _compat_config(tmp)  # drops quantization_config: put it back, it is what makes OUT load quantized
            cfg_json = json.loads((tmp / "config.json").read_text())
            cfg_json["quantization_config"] = qc
            (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
            del model
            report.setdefault("architecture", {})["ffn_layers"] = ffn_layers
            (tmp / SLIMLM_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
            quantized, _ = load_model(str(tmp))
            after = {"disk_bytes": dir_bytes(tmp), "memory_bytes": module_bytes(quantized)}
            ppl_after = _perplexity(quantized, tokenizer, config) if config.ppl_text else None
            record = {
                "method": config.method, "config": asdict(config), "source_model": spec,
                "library": {"bitsandbytes": require("bitsandbytes", "quant").__version__},
                "before": before, "after": after,
                "memory_ratio": after["memory_bytes"] / before["memory_bytes"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if ppl_before is not None:
                record["perplexity"] = {"text": config.ppl_text, "windows": ppl_before["windows"],
                                        "seq_len": config.ppl_seq_len, "before": ppl_before["ppl"],
                                        "after": ppl_after["ppl"], "change": ppl_after["ppl"] / ppl_before["ppl"] - 1}
            report["quantization"] = record
            (tmp / SLIMLM_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
