"""Shared fixtures: tiny random model directories (no download) and the shared data folder."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Python processes the tests start (`python -c`, `python -m slimlm`) keep the working directory off sys.path: in the
# checkout, the source folder kernels/ would hide the `kernels` package that transformers imports.
os.environ["PYTHONSAFEPATH"] = "1"
# slimlm's cache (models converted from GGUF, the exports `slimlm serve` makes) goes to a folder of this test run, never
# the user's own (~/.cache/slimlm held a served export of every tiny test model a run had made); removed at exit.
os.environ["SLIMLM_CACHE"] = tempfile.mkdtemp(prefix="slimlm-test-cache-")
atexit.register(shutil.rmtree, os.environ["SLIMLM_CACHE"], True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def bench_script():
    """Import a script of benchmarks/ by name (`bench_script("decode_bound")`): they are not a package."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks"
                                                      / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 6-layer random Llama whose layers 2-3 barely change the hidden state."""
    from slimlm.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", plant_redundant=(2, 2))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """Plain text for calibration in tests (self-calibration is tested on its own: sampling is slow)."""
    import random

    rng = random.Random(0)
    words = ("the model layer token hidden state river city music science history small large quickly "
             "because when where which about under over again never always people time year day").split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + "."
                     for _ in range(400))
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text)
    return path
