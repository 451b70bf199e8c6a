"""The machine and the library versions a report records: the one place that reads them.

`library_versions("torch", "onnxruntime", ...)` reads installed versions from the distributions' metadata (never by
importing: importing bitsandbytes only to learn its version logs warnings); `machine()` says what ran it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# import name -> the distributions that may provide it, in order
DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "llama_cpp": ("llama_cpp_python", "llama-cpp-python"),
}


def library_versions(*names: str) -> dict[str, str | None]:
    """{name: installed version, or None when absent} for each import name."""
    out: dict[str, str | None] = {}
    for name in names:
        out[name] = None
        for dist in DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cores_available() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine() -> dict:
    """Python, OS and architecture, CPU model, usable cores and torch's thread count."""
    import torch

    return {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
            "platform": platform.platform(), "cpu": cpu_name(), "cores_available": cores_available(),
            "cpu_threads": torch.get_num_threads()}
