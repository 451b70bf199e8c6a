"""Files and directories: where outputs go, how they are written, and the two JSON files a model directory holds.

Outputs are written whole or not at all (`atomic_dir` for a directory, `write_file` for one file); `check_out`,
`check_report` and `check_writable` refuse an unusable place before any work. `slimlm.json` (the record of what
slimlm did to a model) is read by `read_slimlm_json` and written only by `write_record`; `config.json` is
edited only through `edit_config`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from slimlm.errors import SlimlmError

SLIMLM_JSON = "slimlm.json"
CONFIG_JSON = "config.json"


def cache_dir() -> Path:
    root = os.environ.get("SLIMLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimlm"
    )
    return Path(root)


def read_slimlm_json(where) -> dict:
    path = Path(where) / SLIMLM_JSON
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimlmError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("architecture") or {}, dict):
        raise SlimlmError(f"{path} is not a slimlm record: expected a JSON object")
    return info


def write_record(directory: str | os.PathLike, report: dict) -> Path:
    """Write `report` as the directory's `slimlm.json` (the one writer of that file)."""
    return write_file(Path(directory) / SLIMLM_JSON, json.dumps(report, indent=2, default=str) + "\n")


def edit_config(directory: str | os.PathLike, change: Callable[[dict], None]) -> dict:
    """Read the directory's `config.json`, let `change` modify the dict in place, write it back (keys sorted);
    return the dict. The one read-modify-write of that file."""
    path = Path(directory) / CONFIG_JSON
    cfg = json.loads(path.read_text())
    change(cfg)
    write_file(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def compat_config(path: Path, keep_quantization: bool = False) -> None:
    """Make config.json read the same under transformers 4.x (which ignores `rope_parameters`); drop its
    `quantization_config` unless `keep_quantization` (a bitsandbytes directory loads quantized through it)."""

    def change(cfg: dict) -> None:
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if "dtype" in cfg:
            cfg.setdefault("torch_dtype", cfg["dtype"])
        if not keep_quantization:
            cfg.pop("quantization_config", None)

    edit_config(path, change)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after minutes of work, if `path` could not be created: probe its nearest existing parent."""
    path = Path(path).expanduser()
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SlimlmError(f"cannot write to {path}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".slimlm-probe-", dir=parent))
    except OSError as exc:
        raise SlimlmError(f"cannot write to {path}: cannot create files in {parent} ({exc.strerror or exc})") from exc
    return path


def check_report(path: str | os.PathLike, flag: str = "--json") -> Path:
    """A report file that may be written (see `write_file`): not a directory, and its place can be created."""
    if Path(path).expanduser().is_dir():
        raise SlimlmError(f"{flag} {path} is a directory, not a file")
    return check_writable(path)


def check_out(out: str | os.PathLike, force: bool, model: str | os.PathLike | None = None) -> Path:
    """An output directory that may be written: refused if it exists (without `force`), exists but is not a
    directory, is, lies inside or holds the local model `model` (which `force` would destroy), or cannot be
    created."""
    from slimlm.models import ALIASES

    out = Path(out).expanduser()
    src = Path(model).expanduser() if model is not None and model not in ALIASES else None
    if src is not None and src.exists():
        src, dst = src.resolve(), out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            where = "is" if dst == src else "is inside" if src in dst.parents else "contains"
            raise SlimlmError(f"{out} {where} the model {model}: write the output elsewhere")
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    return check_writable(out)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory next to `out`; rename it to `out` only if the block succeeds."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists (use --force to overwrite)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise SlimlmError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if out.exists():
            trash = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write a small output file (a JSON report, a PNG) whole or not at all, creating its missing parent directories."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def dir_bytes(path) -> int:
    """Size on disk of the weight files of a model directory (safetensors, bin, onnx and external data)."""
    path = Path(path)
    suffixes = (".safetensors", ".bin", ".onnx", ".data", ".onnx_data")
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(suffixes))
