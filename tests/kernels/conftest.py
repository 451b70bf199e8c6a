"""Fixtures for the kernel tests: interpreted runs and GPU compiles happen in subprocesses.

TRITON_INTERPRET must be set before triton defines a kernel, and must not leak into other tests, so the
interpreted runs go to `interp_worker.py` started with it set; the compile checks go to `compile_worker.py`
started with it unset. All the workers the selected tests need start together, when the first of them is
asked for, so that they share the machine's cores (the interpreter and the compiler are single-threaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Enough for the slowest worker on two busy cores; a worker that hangs fails its tests instead of the run.
WORKER_TIMEOUT_S = 900

# fixture name -> (script, one argument list per process, run under the interpreter?)
JOBS = {
    "interpreted_shapes": ("interp_worker.py", [["shapes:0/2", "configs"], ["shapes:1/2", "extras"]], True),
    "interpreted_minimodel": ("interp_worker.py", [["minimodel"]], True),
    "compiled": ("compile_worker.py", [["80"], ["90"]], False),
}


def _env(interpret: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # the workers import their helpers (ffn_cases) from the script's own folder, which PYTHONSAFEPATH (set for the
    # other subprocesses by tests/conftest.py) would leave off sys.path
    env.pop("PYTHONSAFEPATH", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    # One BLAS thread per worker: the interpreter's dots are small, and threads spinning on a shared machine
    # make each one ~300x slower.
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class _Job:
    """The worker processes behind one fixture."""

    def __init__(self, script: str, arg_lists: list[list[str]], interpret: bool, tmp: Path):
        self.script = script
        self.outs = [tmp / f"{script.removesuffix('.py')}{k}.pt" for k in range(len(arg_lists))]
        self.args = [[str(out), *a] if interpret else a for out, a in zip(self.outs, arg_lists)]
        self.procs = [
            subprocess.Popen([sys.executable, str(HERE / script), *a], env=_env(interpret), cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for a in self.args
        ]
        self.stdout: list[str] | None = None

    def wait(self) -> list[str]:
        if self.stdout is None:
            self.stdout = []
            for args, proc in zip(self.args, self.procs):
                try:
                    out, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                    pytest.fail(f"{self.script} {' '.join(args)} ran past {WORKER_TIMEOUT_S}s:\n{err[-4000:]}")
                if proc.returncode != 0:
                    pytest.fail(f"{self.script} {' '.join(args)} exited {proc.returncode}:\n{err[-4000:]}")
                self.stdout.append(out)
        return self.stdout

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="session")
def _workers(request, tmp_path_factory):
    """Starts the workers for every JOBS fixture that a selected test uses."""
    wanted = {name for item in request.session.items for name in getattr(item, "fixturenames", ()) if name in JOBS}
    tmp = tmp_path_factory.mktemp("kernel_workers")
    jobs = {}
    for name in JOBS:
        if name in wanted:
            script, arg_lists, interpret = JOBS[name]
            (tmp / name).mkdir()
            jobs[name] = _Job(script, arg_lists, interpret, tmp / name)
    yield jobs
    for job in jobs.values():
        job.kill()


def _load(job: _Job) -> dict:
    import torch

    job.wait()
    res = {}
    for out in job.outs:
        res.update(torch.load(out))
    return res


@pytest.fixture(scope="session")
def interpreted_shapes(_workers) -> dict:
    """{case id: {"out", "same", "ref32"} or other tensors} for every shape case, forced config and extra."""
    return _load(_workers["interpreted_shapes"])


@pytest.fixture(scope="session")
def interpreted_minimodel(_workers) -> dict:
    return _load(_workers["interpreted_minimodel"])


@pytest.fixture(scope="session")
def compiled(_workers) -> list[dict]:
    """One row per (arch, kernel, dtype, config): the compiler's shared memory, or its error."""
    return [row for out in _workers["compiled"].wait() for row in json.loads(out.strip().splitlines()[-1])]
