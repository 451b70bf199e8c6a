"""LLM-Streamline layer pruning (arXiv 2403.19135) and its baselines: ShortGPT and plain removal.

`slimlm.compress` is both this package and the function: `slimlm.compress(model, CompressConfig(...))`
calls `slimlm.compress.run.compress` (the package's module class is callable, since `import slimlm.compress`
makes the package, not the function, the attribute `slimlm.compress`).
"""

import sys
import types

from slimlm import lazy_getattr
from slimlm.compress.config import CompressConfig

__all__ = ["CompressConfig", "CompressResult", "compress"]

# torch and the pipeline load on first use, not when the CLI reads the config
__getattr__ = lazy_getattr(__name__, {"compress": "slimlm.compress.run", "CompressResult": "slimlm.compress.run"})


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
