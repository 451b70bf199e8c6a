"""`slimlm serve MODEL ...`: the flags are `ServeConfig`'s fields.

Import-light on purpose: `slimlm --help` loads this module, so FastAPI, uvicorn and torch are imported
only when the command runs. The integer flags use `slimlm.cli`'s parsers; ranges (a port up to 65535, a
context of at least 2 tokens) are `ServeConfig`'s to check.
"""

from __future__ import annotations

import os

from slimlm.cli import _non_negative_int, _positive_int
from slimlm.serve.config import ONNX_WEIGHTS


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL over an OpenAI-compatible HTTP API with continuous batching.")
    p.add_argument("model", metavar="MODEL", help="model directory, Hub id, .gguf file, 'smollm2-135m', "
                                                  "or an ONNX export directory with --backend onnx")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="auto (default): ONNX Runtime with --onnx-weights on a CPU-only machine with the onnx extra "
                        "(MODEL exported once into the cache), else PyTorch")
    p.add_argument("--onnx-weights", default="auto", choices=ONNX_WEIGHTS,
                   help="weights of the export --backend auto makes (default auto: int8 weight-only on a CPU with "
                        "int8 dot-product instructions (VNNI, AMX), else fp32)")
    p.add_argument("--quantize", default=None, choices=["int8", "nf4"], help="quantize the weights at load time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_non_negative_int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SLIMLM_API_KEY)")
    key.add_argument("--api-key-file", default=None, metavar="F", help="read the key from a file")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="most sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=_non_negative_int, default=64,
                   help="most requests waiting; past it 429 (default 64)")
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--prefix-cache-mb", type=_non_negative_int, default=256, metavar="MB",
                   help="memory for recent prompts' key/value cache: a prompt beginning like one of them prefills "
                        "only the rest (ONNX backend; default 256, 0: off)")
    p.add_argument("--prefill-chunk", type=_non_negative_int, default=256, metavar="N",
                   help="prefill a longer prompt N tokens at a time, the running streams decoding between the parts "
                        "(ONNX backend; default 256, 0: whole prompts)")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="name clients use (default: MODEL)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: the fastest of 1, cores/2, cores, timed at start-up)")
    p.set_defaults(func=cmd_serve)


def read_key(args) -> str | None:
    from slimlm.errors import SlimlmError

    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                key = f.read().strip()
        except OSError as exc:
            raise SlimlmError(f"cannot read the API key file {args.api_key_file}: {exc.strerror or exc}") from None
        if not key:
            raise SlimlmError(f"the API key file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("SLIMLM_API_KEY") or None


def config_from_args(args):
    from slimlm.serve.config import ServeConfig

    return ServeConfig(model=args.model, backend=args.backend, onnx_weights=args.onnx_weights, quantize=args.quantize,
                       host=args.host, port=args.port,
                       api_key=read_key(args), max_batch=args.max_batch, max_queue=args.max_queue,
                       max_model_len=args.max_model_len, prefix_cache_mb=args.prefix_cache_mb,
                       prefill_chunk=args.prefill_chunk,
                       served_model_name=args.served_model_name,
                       device=args.device, dtype=args.dtype, threads=args.threads)


def cmd_serve(args) -> int:
    from slimlm.errors import require

    config = config_from_args(args)
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    from slimlm.serve.backends import is_onnx_dir

    if not is_onnx_dir(config.model):
        from slimlm.models import resolve

        resolve(config.model)  # a bad MODEL fails here, in one line, before the server starts
    from slimlm.serve.app import serve

    return serve(config)
