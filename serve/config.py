"""`ServeConfig`: every knob of `slimlm serve`, validated once, shared by the CLI, the app and the tests.

The CLI flags are these fields; nothing about serving is decided only in the CLI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from slimlm.errors import SlimlmError

BACKENDS = ("auto", "torch", "onnx")
ONNX_WEIGHTS = ("auto", "fp32", "fp16", "int8", "int4")
# CPU flags of int8 dot-product instructions: with them onnxruntime's int8 weight-only MatMulNBits is the fastest
# CPU format; without them (AVX2 only) its prompt and batched steps fall far behind fp32 (see `auto_onnx_weights`)
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def auto_onnx_weights(flags: set[str] | None = None) -> tuple[str, str]:
    """(weights, why) of the export `--onnx-weights auto` makes, from the CPU's instruction sets.

    The rule comes from measurements on two kinds of CPU (serve/README.md, "Defaults per CPU"): on an AVX2-only AMD
    EPYC, fp32 weights served 8 streams 1.64x faster than int8 with first tokens 2.2x sooner at one stream (int8 won
    only single-stream decode); on an AMD EPYC with AVX512-VNNI, int8 served 2.10x fp32's tokens at one stream and
    1.46x at 8, with first tokens sooner at both."""
    from slimlm.env import cpu_flags

    flags = cpu_flags() if flags is None else flags
    found = [f for f in INT8_DOT_FLAGS if f in flags]
    if found:
        return "int8", f"this CPU has int8 dot-product instructions ({found[0]})"
    if not flags:
        return "int8", "the CPU's instruction sets are unknown here"
    return "fp32", "this CPU has no int8 dot-product instructions (VNNI/AMX): int8 weights slow prompts and batches"
QUANTIZE = ("int8", "nf4")
# 4 MiB of JSON is ~1M prompt characters: far past any context slimlm serves, small enough to refuse cheaply.
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServeConfig:
    """How to serve one model.

    model: anything `slimlm.load_model` accepts (HF dir, Hub id, .gguf, alias), or an ONNX export dir.
    backend: "auto" (default), "torch" or "onnx" (needs the onnx extra). "auto" serves through ONNX
        Runtime on a CPU-only machine where the onnx extra is installed (MODEL is exported once, with
        `onnx_weights`, into the slimlm cache; an ONNX export directory is served as is), and through
        PyTorch otherwise (CUDA, --quantize, --dtype, or no onnxruntime).
    onnx_weights: weights of the export "auto" makes: "auto" (default: "int8", block-wise weight-only int8
        MatMulNBits, on a CPU with int8 dot-product instructions, else "fp32": `auto_onnx_weights`), "int8",
        "fp32", "fp16" or "int4".
    quantize: None, "int8" or "nf4" (through `slimlm.export.quantize`).
    host, port: where uvicorn listens; 127.0.0.1 unless told otherwise.
    api_key: if set, every route but /health needs `Authorization: Bearer KEY`.
    max_batch: most sequences decoded together in one step. 32: at 32 concurrent streams a batch of 16 made half
        the requests wait a whole generation for their first token (TTFT p50 3.0 s against 0.89 s at 32, same
        output tok/s within noise; 7-of-30 SmolLM2, int8 ONNX, 2-vCPU AMD EPYC), and llama-server's slots are as many.
    max_queue: most requests waiting for a batch slot; past it, 429.
    max_model_len: context length (prompt + completion); default: the model's own.
    prefix_cache_mb: memory the ONNX backend keeps recent prompts' key/value cache in, so that a prompt beginning
        like one of them (a system prompt, a conversation's earlier turns) prefills only the rest (`serve.prefix`);
        0 turns it off. The PyTorch backend has none.
    prefill_chunk: the ONNX backend prefills a prompt longer than this many tokens a part at a time, with the
        running batch's decode steps between the parts, when other sequences are decoding (so a long prompt does
        not stall every stream for its whole prefill); 0: whole prompts. At least 16.
    served_model_name: the name clients pass as `model`; default: the MODEL argument.
    max_body_bytes: larger request bodies get 413.
    device, dtype: passed to `load_model` (default: CPU, float32).
    threads: torch intra-op threads (default on CPU: timed at start-up among 1, cores/2 and cores).
    """

    model: str = "smollm2-135m"
    backend: str = "auto"
    onnx_weights: str = "auto"
    quantize: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    max_batch: int = 32
    max_queue: int = 64
    max_model_len: int | None = None
    prefix_cache_mb: int = 256
    prefill_chunk: int = 256
    served_model_name: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SlimlmError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.onnx_weights not in ONNX_WEIGHTS:
            raise SlimlmError(f"unknown ONNX weights {self.onnx_weights!r}: use one of {', '.join(ONNX_WEIGHTS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise SlimlmError(f"unknown quantization {self.quantize!r}: use one of {', '.join(QUANTIZE)}")
        for name in ("max_batch", "max_body_bytes"):
            if int(getattr(self, name)) < 1:
                raise SlimlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prefill_chunk != 0 and self.prefill_chunk < 16:
            raise SlimlmError(f"prefill_chunk must be 0 (whole prompts) or at least 16, got {self.prefill_chunk}")
        if self.prefix_cache_mb < 0:
            raise SlimlmError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.max_queue < 0:
            raise SlimlmError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SlimlmError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise SlimlmError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise SlimlmError("the API key is empty")
        if self.threads is not None and self.threads < 1:
            raise SlimlmError(f"threads must be at least 1, got {self.threads}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def public(self) -> dict:
        """The config as JSON, without the key."""
        out = asdict(self)
        out["api_key"] = "***" if self.api_key else None
        return out
