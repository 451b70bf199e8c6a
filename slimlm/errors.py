"""User-facing errors.

`SlimlmError` is raised for anything the user can fix (a bad path, a bad flag, a missing extra);
the CLI turns it into one line on stderr and exit code 2, never a traceback.
"""


class SlimlmError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-line install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the hint is the whole point of this function
        raise SlimlmError(f"{module} is not installed: pip install 'slimlm[{extra}]'") from exc
