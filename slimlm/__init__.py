"""slimlm: compress causal language models, then quantize, export and serve them.

`import slimlm` stays light: heavy and optional modules load on first use, by one rule. A package names its
public objects in a table `{name: module}` and `lazy_getattr` loads each from its module on first access
(PEP 562). An optional third-party dependency is imported inside the function that needs it, through
`slimlm.errors.require` where the user should get an install hint.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["load_model", "compress", "CompressConfig", "save_model", "__version__"]


def lazy_getattr(package: str, where: dict[str, str]):
    """A module `__getattr__` that imports `where[name]` (a module path) on first access and returns its `name`, or
    the module itself when it is the package's submodule `name`."""

    def __getattr__(name: str):
        if name in where:
            module = importlib.import_module(where[name])
            return module if where[name] == f"{package}.{name}" else getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


# `slimlm.compress` is the package, which is callable (see slimlm/compress/__init__.py)
__getattr__ = lazy_getattr(__name__, {"load_model": "slimlm.models", "save_model": "slimlm.models",
                                      "compress": "slimlm.compress", "CompressConfig": "slimlm.compress"})
