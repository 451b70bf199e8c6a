"""LLM-Streamline layer pruning (arXiv 2403.19135) and its baselines: ShortGPT and plain removal.

`slimlm.compress` is both this package and the function: `slimlm.compress(model, CompressConfig(...))`
calls `slimlm.compress.run.compress`.
"""

import sys
import types

from slimlm.compress.config import CompressConfig
from slimlm.compress.run import CompressResult, compress

__all__ = ["CompressConfig", "CompressResult", "compress"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
