"""slimlm: compress causal language models, then quantize, export and serve them.

`import slimlm` stays light: heavy and optional modules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "compress", "CompressConfig", "save_model", "__version__"]


def __getattr__(name):
    if name in ("load_model", "save_model"):
        from slimlm import models

        return getattr(models, name)
    if name in ("compress", "CompressConfig"):
        import importlib

        mod = importlib.import_module("slimlm.compress")
        return mod if name == "compress" else getattr(mod, name)
    raise AttributeError(f"module 'slimlm' has no attribute {name!r}")
