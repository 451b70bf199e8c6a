"""`slimlm serve` as users run it: import-light registration, one-line errors, and a real process that
drains in-flight requests on SIGTERM and never logs its API key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

WAIT_S = 120


def test_import_is_light():
    code = ("import sys, slimlm, slimlm.serve.cli, slimlm.serve.config;"
            "heavy = [m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'torch') if m in sys.modules];"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == ""


def test_parser_flags():
    from slimlm.cli import build_parser

    p = build_parser()
    args = p.parse_args(["serve", "m", "--max-batch", "4", "--max-queue", "0", "--max-model-len", "512",
                         "--served-model-name", "x", "--backend", "torch"])
    assert (args.max_batch, args.max_queue, args.max_model_len, args.served_model_name) == (4, 0, 512, "x")
    assert args.host == "127.0.0.1" and args.port == 8000
    for bad in (["--max-batch", "0"], ["--backend", "tf"], ["--quantize", "int3"],
                ["--api-key", "a", "--api-key-file", "f"]):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", "m", *bad])


def test_bad_model_is_one_line(capsys):
    from slimlm.cli import main

    assert main(["serve", "/nonexistent/model-dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimlm: error:")


def test_api_key_file(tmp_path):
    from slimlm.cli import build_parser
    from slimlm.errors import SlimlmError
    from slimlm.serve.cli import config_from_args

    key = tmp_path / "key"
    key.write_text("abc123\n")
    args = build_parser().parse_args(["serve", "m", "--api-key-file", str(key)])
    cfg = config_from_args(args)
    assert cfg.api_key == "abc123" and "abc123" not in repr(cfg) and cfg.public()["api_key"] == "***"
    key.write_text("  \n")
    with pytest.raises(SlimlmError):
        config_from_args(args)


def test_onnx_backend_needs_onnxruntime(monkeypatch):
    """Without onnxruntime, --backend onnx fails with one line naming the extra to install."""
    from slimlm.errors import SlimlmError
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(SlimlmError, match=r"onnxruntime is not installed: pip install 'slimlm\[onnx\]'"):
        load_backend(ServeConfig(model="x", backend="onnx"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight(serve_tiny_dir, tmp_path):
    key = "sk-never-logged-7f3a"
    key_file = tmp_path / "key"
    key_file.write_text(key)
    port = _free_port()
    log = tmp_path / "server.log"
    env = dict(os.environ, SLIMLM_CACHE=str(tmp_path / "cache"))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slimlm", "serve", str(serve_tiny_dir), "--port", str(port),
                                 "--api-key-file", str(key_file), "--threads", "1", "--served-model-name", "tiny"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        ready = threading.Event()
        for _ in range(600):  # bounded: import + load of the tiny model
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            ready.wait(0.1)
        lines = []
        with httpx.Client(base_url=url, headers=headers, timeout=WAIT_S) as http, http.stream(
                "POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 400, "temperature": 0,
                                                 "stream": True}) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            lines.append(next(line for line in it if line))
            proc.send_signal(signal.SIGTERM)
            lines += [line for line in it if line]
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["timings"]["completion_tokens"] == 400
    text = log.read_text()
    assert key not in text
    assert "Bearer" not in text


def test_auto_backend_resolution(tmp_path, monkeypatch):
    """auto: an ONNX export dir -> onnx; CUDA, --quantize or --dtype -> torch; a CPU with the onnx extra -> onnx,
    without it -> torch."""
    import importlib.util

    import torch

    from slimlm.serve import backends
    from slimlm.serve.config import ServeConfig

    onnx_dir = tmp_path / "exported"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_find = importlib.util.find_spec
    assert backends.resolve_backend(ServeConfig(model=str(onnx_dir))) == "onnx"
    assert backends.resolve_backend(ServeConfig(model="m", backend="torch")) == "torch"
    assert backends.resolve_backend(ServeConfig(model="m", quantize="int8")) == "torch"
    assert backends.resolve_backend(ServeConfig(model="m", dtype="bfloat16")) == "torch"
    assert backends.resolve_backend(ServeConfig(model="m", device="cuda")) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert backends.resolve_backend(ServeConfig(model="m")) == "onnx"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find(name, *a))
    assert backends.resolve_backend(ServeConfig(model="m")) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert backends.resolve_backend(ServeConfig(model="m")) == "torch"


def test_unknown_onnx_weights_rejected():
    from slimlm.errors import SlimlmError
    from slimlm.serve.config import ServeConfig

    with pytest.raises(SlimlmError, match="ONNX weights"):
        ServeConfig(model="m", onnx_weights="int3")


def test_auto_falls_back_to_torch_when_export_fails(serve_tiny_dir, monkeypatch):
    from slimlm.serve import backends
    from slimlm.serve.config import ServeConfig

    def broken(spec, weights):
        raise RuntimeError("exporter cannot take this model")

    monkeypatch.setattr(backends, "resolve_backend", lambda config: "onnx")
    monkeypatch.setattr(backends, "_onnx_dir", broken)
    backend, _ = backends.load_backend(ServeConfig(model=str(serve_tiny_dir), threads=1))
    assert backend.name == "torch"
    with pytest.raises(RuntimeError, match="exporter"):  # asked for explicitly: the failure is the answer
        backends.load_backend(ServeConfig(model=str(serve_tiny_dir), backend="onnx", threads=1))


def test_cached_export_with_old_settings_is_made_again(serve_tiny_dir, tmp_path, monkeypatch):
    """The ONNX export serving derives is reused while its settings equal today's export defaults, and made
    again when they differ (an export from before a default changed)."""
    import json

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slimlm.serve import backends

    monkeypatch.setattr(backends, "_derived_dir", lambda spec, kind, tag: tmp_path / "cache" / kind / tag)
    calls = []
    from slimlm.export import onnx as export_onnx_module

    real_export = export_onnx_module.export_onnx

    def counting_export(*args, **kwargs):
        calls.append(1)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_onnx_module, "export_onnx", counting_export)
    out = backends._onnx_dir(str(serve_tiny_dir), "fp32")
    backends._onnx_dir(str(serve_tiny_dir), "fp32")
    assert len(calls) == 1  # reused
    meta = tmp_path / "cache" / "serve-onnx" / "fp32" / "slimlm.json"
    report = json.loads(meta.read_text())
    report["onnx"]["config"].pop("attention")  # as an export made before the attention setting existed
    meta.write_text(json.dumps(report))
    assert backends._onnx_dir(str(serve_tiny_dir), "fp32") == out and len(calls) == 2
    assert json.loads(meta.read_text())["onnx"]["config"]["attention"] == "auto"


@pytest.mark.parametrize("flag,value,field", [("--max-model-len", "1", "max_model_len"), ("--port", "70000", "port")])
def test_flag_ranges_are_checked_by_the_config(capsys, flag, value, field):
    """The CLI parses integers with slimlm's shared parsers; the ranges are ServeConfig's, in one line."""
    from slimlm.cli import main

    assert main(["serve", "m", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and value in err[0]


def test_auto_onnx_weights_follow_the_cpus_int8_instructions():
    from slimlm.serve.config import ServeConfig, auto_onnx_weights

    assert ServeConfig(model="m").onnx_weights == "auto"
    assert auto_onnx_weights({"avx2", "avx512f", "avx512_vnni"})[0] == "int8"
    assert auto_onnx_weights({"avx2", "avx_vnni"})[0] == "int8"
    assert auto_onnx_weights({"avx2", "avx512f", "amx_int8"})[0] == "int8"
    weights, why = auto_onnx_weights({"avx2", "fma", "avx512f"})
    assert weights == "fp32" and "VNNI" in why
    assert auto_onnx_weights(set())[0] == "int8"  # unknown CPU: the format measured fastest where it is known


def test_auto_weights_are_chosen_and_said(serve_tiny_dir, monkeypatch, caplog):
    import logging

    from slimlm.serve import backends, config

    made = []
    monkeypatch.setattr(backends, "_onnx_dir", lambda spec, weights: made.append(weights) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    monkeypatch.setattr(config, "auto_onnx_weights", lambda flags=None: ("fp32", "a test CPU"))
    with caplog.at_level(logging.INFO, logger="slimlm.serve"), pytest.raises(RuntimeError, match="stop here"):
        backends._load_onnx(config.ServeConfig(model=str(serve_tiny_dir), backend="onnx"))
    assert made == ["fp32"] and "ONNX weights: fp32 (a test CPU" in caplog.text
