"""LLM-Streamline layer pruning (arXiv 2403.19135) and its baselines: ShortGPT and plain removal.

`slimlm.compress` is both this package and the function: `slimlm.compress(model, CompressConfig(...))`
calls `slimlm.compress.run.compress`.
"""

import sys
import types

from slimlm.compress.config import CompressConfig

__all__ = ["CompressConfig", "CompressResult", "compress"]


def __getattr__(name):  # torch and the pipeline load on first use, not when the CLI reads the config
    if name in ("compress", "CompressResult"):
        from slimlm.compress import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from slimlm.compress.run import compress

        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
