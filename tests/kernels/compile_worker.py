"""Compiles every FFN kernel with every autotune config for a real GPU target, on a machine without one.

    python compile_worker.py ARCH      (80: A100, 90: H100)

`triton.compile(ASTSource(...), target=GPUTarget("cuda", ARCH, 32))` runs the whole pipeline down to PTX and
a cubin (ptxas ships with triton), so it rejects what the interpreter accepts and reports the shared memory
each kernel needs. Prints one JSON list as its last line: {arch, kernel, dtype, config, shared} or {..., error}.
"""

from __future__ import annotations

import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_worker.py must run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from slimlm.kernels import ffn_triton  # noqa: E402


def main(argv: list[str]) -> None:
    arch = int(argv[0])
    rows = []
    for name in ffn_triton.KERNELS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            fn, specs = ffn_triton.compile_specs(name, dtype)
            for signature, constexprs, attrs, options in specs:
                config = {k: v for k, v in constexprs.items() if k != "INTERPRETED"}
                row = {"arch": arch, "kernel": name, "dtype": str(dtype).removeprefix("torch."),
                       "config": dict(config, num_warps=options["num_warps"], num_stages=options["num_stages"])}
                try:
                    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                              target=GPUTarget("cuda", arch, 32), options=options)
                    row["shared"] = int(compiled.metadata.shared)
                except Exception as exc:  # reported per config by the test
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
