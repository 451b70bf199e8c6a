"""`slimlm export onnx`: trace a (compressed) decoder with a KV cache, quantize its weights, validate it.

The stage, `export_onnx`, calls three steps that live apart, in order:

- trace (`slimlm.export.onnx_trace`): the decoder with its cache as flat tensors, by default (`attention="auto"`)
  with each attention layer through onnxruntime's fused GroupQueryAttention and RotaryEmbedding ops
  (`slimlm.export.attention`), RMSNorms fused by onnxscript's onnxruntime rewrites (`slimlm.export.graph`);
- quantize (`slimlm.export.onnx_quant`): "fp32" as exported; "fp16" converted before export (for the CUDA
  provider); "int8" and "int4" through onnxruntime's `MatMulNBitsQuantizer`, after which the MatMulNBits that share
  an input are packed into one: a decode step of SmolLM2-135M's compression runs ~370 nodes instead of ~1400;
- validate (`slimlm.export.onnx_validate`): the graph against the PyTorch model, within `TOLERANCES[weights]`.

`slimlm.json` maps the graph's cache index j to the model's layer index (`onnx.kv_layers`): an FFN replacement has
no attention and no cache in the graph. Every name of the three step modules stays importable from here.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slimlm.errors import SlimlmError, require
from slimlm.export.genai import FILE as GENAI_FILE
from slimlm.export.genai import genai_config
from slimlm.export.onnx_quant import (  # noqa: F401  (re-exported)
    INT4_KEEP8,
    INT4_METHODS,
    KEEP8_LAYERS,
    check_int4_blocks,
    quantize_int4,
    quantize_int8,
    weight_nodes,
)
from slimlm.export.onnx_trace import (  # noqa: F401  (re-exported)
    EXTERNAL_DATA_BYTES,
    DecoderWithPast,
    add_logits_to_keep,
    input_names,
    kv_shape,
    output_names,
    quiet_exporter,
    save_onnx,
    trace,
    use_fused,
)
from slimlm.export.onnx_validate import (  # noqa: F401  (re-exported)
    TOLERANCES,
    VALIDATE_GREEDY,
    VALIDATE_PAST,
    VALIDATE_PROMPT,
    VALIDATE_STEP,
    validate,
)
from slimlm.files import SLIMLM_JSON

_save_onnx = save_onnx  # its former name

WEIGHTS = ("fp32", "fp16", "int8", "int4")
ATTENTION = ("auto", "fused", "plain")
MODEL_FILE = "model.onnx"
# The quantization block each weight type gets by default, and int8's head block. int8 at 64 values a scale decodes
# faster than at 32 (fewer scales to read and apply in MatMulNBits' int8 kernel), and its rounding costs perplexity
# mostly in the head, which stays at 32: `benchmarks/int8_blocks.py` has the figures (README, "ONNX weights"). int4
# keeps 32: its rounding error is 16 times int8's, and the block is where its accuracy comes from.
DEFAULT_BLOCK = {"int8": 64, "int4": 32}
DEFAULT_HEAD_BLOCK = 32


@dataclass
class OnnxConfig:
    """What `export_onnx` does.

    weights: "fp32" | "fp16" | "int8" | "int4" (see the module docstring).
    opset: ONNX opset of the exported graph (18 and up; quantization adds `com.microsoft` ops).
    block_size: int4/int8 quantization block (power of two, 16..256; smaller is more accurate, bigger is smaller and
        faster). None (default): `DEFAULT_BLOCK[weights]`, 64 for int8 and 32 for int4.
    head_block_size: int8 only: the output head's block (and so a tied embedding's), None (default) 32; the head is
        where int8's rounding shows (`DEFAULT_BLOCK`).
    int4_accuracy_level: MatMulNBits accuracy_level for int4 and int8 (4 = int8 activations per block, fastest
        on CPU; 0 = fp32 compute).
    int4_method: "kquant" (scales and integer zero points searched per block as llama.cpp's k-quants do, through
        onnxruntime's `KQuantWeightOnlyQuantConfig`: the fast int8-compute kernel), "rtn" (plain round-to-nearest:
        as fast, less accurate) or "hqq" (HQQ-fitted scales and float zero points: accurate, but onnxruntime 1.31
        runs float zero points on a slow CPU path, ~1 tok/s decode on SmolLM2-135M). See `quantize_int4`.
    int4_keep8: weight matrices kept at 8 bits in an int4 export ("kquant" and "rtn"), matched against the end of
        the PyTorch parameter name each MatMul multiplies by ("head" is the output head): the default keeps the
        head, the MLP down projections and the query/key/value projections (see `quantize_int4`); with
        quantization-aware training the head only. () for all 4-bit.
    int4_keep8_layers: which decoder layers `int4_keep8` applies to (the head is always kept): "all" (default) or
        "mixed" (the first and last eighth of the layers and every third in between, the rule llama.cpp's Q4_K_M
        and onnxruntime-genai's k_quant_mixed use to give some layers more bits).
    attention: "fused" (onnxruntime's GroupQueryAttention and RotaryEmbedding ops, see `slimlm.export.attention`),
        "plain" (attention traced as transformers writes it) or "auto": fused where the model allows it, except
        for fp16 (meant for the CUDA provider, where the fused op's padding bias is not verified here).
    qat_minutes: int4 only: before the export, train the model on the 4-bit grid it is exported to, distilled
        from its unquantized self for this many minutes (`slimlm.export.qat`; calibration text, written by the model
        itself, comes on top). The weights are then exported round-to-nearest on exactly that grid (int4_method
        "rtn"), and the 8-bit exceptions default to the head alone. 0 (default) turns it off.
    qat_steps: a fixed number of those training steps instead of the time budget (reproducible anywhere).
    validate: compare with PyTorch after export and fail if outside `TOLERANCES[weights]`.
    """

    weights: str = "fp32"
    opset: int = 18
    block_size: int | None = None
    head_block_size: int | None = None
    int4_accuracy_level: int = 4
    int4_method: str | None = None
    int4_keep8: tuple[str, ...] | None = None
    int4_keep8_layers: str = "all"
    attention: str = "auto"
    qat_minutes: float = 0.0
    qat_steps: int | None = None
    validate: bool = True

    @property
    def qat(self) -> bool:
        """Quantization-aware training runs before the export."""
        return self.weights == "int4" and (self.qat_minutes > 0 or self.qat_steps is not None)

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise SlimlmError(f"unknown ONNX weight type {self.weights!r}: use one of {', '.join(WEIGHTS)}")
        if not 18 <= self.opset <= 23:
            raise SlimlmError(f"opset must be between 18 and 23, got {self.opset}")
        if self.block_size is None:
            self.block_size = DEFAULT_BLOCK.get(self.weights, 32)
        if self.block_size not in (16, 32, 64, 128, 256):
            raise SlimlmError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.head_block_size is not None and self.weights != "int8":
            raise SlimlmError(f"--head-block-size applies to --weights int8, not {self.weights}")
        if self.weights == "int8" and self.head_block_size is None:
            self.head_block_size = DEFAULT_HEAD_BLOCK
        if self.head_block_size not in (None, 16, 32, 64, 128, 256):
            raise SlimlmError(f"head_block_size must be 16, 32, 64, 128 or 256, got {self.head_block_size}")
        if not 0 <= self.qat_minutes < float("inf"):
            raise SlimlmError(f"--qat-minutes must be 0 (off) or a positive number, got {self.qat_minutes}")
        if self.qat_steps is not None and self.qat_steps < 1:
            raise SlimlmError(f"--qat-steps must be at least 1, got {self.qat_steps}")
        if (self.qat_minutes > 0 or self.qat_steps is not None) and self.weights != "int4":
            raise SlimlmError(f"quantization-aware training (--qat-minutes, --qat-steps) is for --weights int4, "
                              f"not {self.weights}")
        if self.int4_method is None:
            self.int4_method = "rtn" if self.qat else "kquant"
        elif self.qat and self.int4_method != "rtn":
            raise SlimlmError(f"quantization-aware training exports the grid it trained on (round to nearest): "
                              f"--int4-method {self.int4_method} would quantize the weights again; leave it out")
        if self.int4_keep8 is None:
            self.int4_keep8 = ("head",) if self.qat else INT4_KEEP8
        if self.int4_method not in INT4_METHODS:
            raise SlimlmError(f"int4_method must be one of {', '.join(INT4_METHODS)}, got {self.int4_method!r}")
        self.int4_keep8 = tuple(self.int4_keep8)
        if self.int4_method == "hqq" and self.int4_keep8 not in ((), INT4_KEEP8):
            raise SlimlmError("--int4-keep8 applies to the kquant and rtn methods: hqq puts every weight at 4 bits")
        if self.int4_keep8_layers not in KEEP8_LAYERS:
            raise SlimlmError(f"int4_keep8_layers must be one of {', '.join(KEEP8_LAYERS)}, "
                              f"got {self.int4_keep8_layers!r}")
        if self.attention not in ATTENTION:
            raise SlimlmError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise SlimlmError(f"int4_accuracy_level must be 0..4, got {self.int4_accuracy_level}")


def export_onnx(spec, out, config: OnnxConfig, overwrite: bool = False, model=None, tokenizer=None) -> dict:
    """Export the model `spec` (anything `load_model` takes; or pass `model` and `tokenizer`) to `out`.

    Writes OUT/model.onnx (+ model.onnx.data when large), config.json, generation_config.json, the
    tokenizer and slimlm.json (the source's record plus an `onnx` section with the validation results).
    Atomic: a failed export or validation leaves nothing at `out`.
    """
    require("onnxruntime", "onnx")
    from slimlm.env import library_versions
    from slimlm.files import atomic_dir, dir_bytes, edit_config, write_record
    from slimlm.models import decoder_layers, export_source

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    given = model is not None
    model, tokenizer, report = export_source(spec, model, tokenizer)
    if getattr(model.config, "quantization_config", None) is not None:
        raise SlimlmError(f"{spec} is quantized with bitsandbytes: export the unquantized model and use "
                          "--weights int8|int4 instead")
    if config.weights == "int4" and config.int4_method != "hqq":
        check_int4_blocks(model, config.block_size)
    qat = None
    if config.qat:
        from slimlm.export.qat import matrix_bits, quantization_aware

        bits = matrix_bits(model, config.block_size, config.int4_keep8, config.int4_keep8_layers)
        if given:  # the caller's model stays as it was; one loaded here is trained in place
            model = copy.deepcopy(model)
        qat = quantization_aware(model, tokenizer, bits, config.block_size, config.qat_minutes, config.qat_steps,
                                 log=_log)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        raw = tmp / (MODEL_FILE if config.weights in ("fp32", "fp16") else "fp32-" + MODEL_FILE)
        graph = trace(model, raw, config)
        fusions = None
        if graph["attention"] == "fused":
            from slimlm.export.graph import fuse_for_ort

            t_fuse = time.perf_counter()
            with quiet_exporter():
                fusions = fuse_for_ort(raw)
            graph["seconds"] = round(graph["seconds"] + time.perf_counter() - t_fuse, 2)
        add_logits_to_keep(raw)
        t_quant = time.perf_counter()
        mix = None
        if config.weights == "int8":
            mix = quantize_int8(raw, tmp / MODEL_FILE, config.block_size, config.int4_accuracy_level,
                                head_block=config.head_block_size)
        elif config.weights == "int4":
            mix = quantize_int4(raw, tmp / MODEL_FILE, config.block_size, config.int4_accuracy_level,
                                config.int4_method, config.int4_keep8, config.int4_keep8_layers)
        timings = {"trace_s": graph["seconds"], "quantize_s": round(time.perf_counter() - t_quant, 2)}
        if raw.name != MODEL_FILE:
            raw.unlink()
            for extra in tmp.glob(raw.name + ".data"):
                extra.unlink()
        model.config.save_pretrained(tmp)
        edit_config(tmp, lambda cfg: cfg.pop("quantization_config", None))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        layers = len(decoder_layers(model))
        kv_heads, head_dim = kv_shape(model.config)
        section = {
            "config": asdict(config), "source_model": str(spec) if spec is not None else None,
            "file": MODEL_FILE, "opset": config.opset,
            "kv_layers": graph["kv_layers"], "attention": graph["attention"],
            # how a batch of rows of different lengths is laid out: "right" (each row's valid slots first; the fused
            # graph computes every row exactly as alone) or "left" (padding first, the plain graph's only layout)
            "padding": "right" if graph["attention"] == "fused" else "left",
            # the graph takes `logits_to_keep` (logits of the last positions only; default all)
            "logits_to_keep": True,
            "max_positions": graph["max_positions"],
            "ffn_layers": [i for i in range(layers) if i not in graph["kv_layers"]],
            "layers": {"attention": graph["n_kv"], "ffn": layers - graph["n_kv"]},
            "kv_heads": kv_heads, "head_dim": head_dim,
            "kv_dtype": "float16" if config.weights == "fp16" else "float32",
            "inputs": input_names(graph["n_kv"]), "outputs": output_names(graph["n_kv"]),
            "disk_bytes": dir_bytes(tmp),
            "quantized_matmuls": mix, "fusions": fusions, "qat": qat,
            "library": library_versions("torch", "onnx", "onnxruntime", "onnxscript"),
        }
        report["onnx"] = section
        write_record(tmp, report)
        # the folder runs in onnxruntime-genai unchanged (og.Model(OUT)); see slimlm.export.genai
        (tmp / GENAI_FILE).write_text(json.dumps(genai_config(model.config, section), indent=2) + "\n")
        section["timings"] = timings
        if config.validate:
            t_val = time.perf_counter()
            section["validation"] = validate(tmp, model, tokenizer, config.weights)
            timings["validate_s"] = round(time.perf_counter() - t_val, 2)
            if not section["validation"]["passed"]:
                raise SlimlmError(f"ONNX validation failed ({config.weights}): "
                                  + "; ".join(section["validation"]["failures"]))
        timings["total_s"] = round(time.perf_counter() - t0, 2)
        write_record(tmp, report)
    return report


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exported_with(path, config: OnnxConfig) -> bool:
    """Whether the export at `path` was made with exactly `config` (its `slimlm.json` records the settings): a
    cached export whose settings differ from today's (a default that changed since) should be made again."""
    try:
        section = json.loads((Path(path) / SLIMLM_JSON).read_text())["onnx"]
        # exports from before a setting: its value then ("all", no quantization-aware training)
        stored = {"int4_keep8_layers": "all", "qat_minutes": 0.0, "qat_steps": None, **section["config"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    # a graph from before the "padding" entry is made again: its fused attention computed a row differently
    # depending on the padding beside it; one from before "logits_to_keep" computed a prompt's head at every position
    # and one from before the quantized embedding kept it in fp32 (twice the disk)
    # and a fused graph from before the rotary went into the attention nodes dispatched 3 more nodes a layer
    quantized = section.get("quantized_matmuls") or {}
    embedding = config.weights in ("fp32", "fp16") or "embedding" in quantized
    folded = section.get("attention") != "fused" or "rotary_into_attention" in (section.get("fusions") or {})
    return (stored == json.loads(json.dumps(asdict(config))) and "padding" in section and "logits_to_keep" in section
            and embedding and folded)
