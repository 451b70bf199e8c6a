"""Shared fixtures for the serve tests: one tiny random model, one backend, apps over it.

One intra-op thread: the tiny model's ops are far too small to split, and CI boxes are shared.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def serve_tiny_dir(tmp_path_factory):
    from slimlm.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4)


@pytest.fixture(scope="session")
def tiny(serve_tiny_dir):
    from slimlm.models import load_model

    return load_model(str(serve_tiny_dir))


@pytest.fixture(scope="session")
def backend(tiny):
    from slimlm.serve.backends import TorchBackend

    model, tok = tiny
    return TorchBackend(model, tok, max_len=256)


@pytest.fixture
def make_client(backend, tiny):
    """make_client(**config) -> a started TestClient over the shared backend (closed at teardown)."""
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    clients = []

    def make(**kw):
        kw.setdefault("served_model_name", "tiny")
        cfg = ServeConfig(model="tiny", **kw)
        client = TestClient(create_app(cfg, backend=backend, tokenizer=tiny[1]))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def _pick_stop(text: str) -> str:
    """A 2-character piece of text, first seen after position 3, to use as a stop string."""
    for i in range(3, len(text) - 2):
        piece = text[i:i + 2]
        if text.index(piece) == i and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no stop string candidate in {text!r}")


@pytest.fixture
def pick_stop():
    return _pick_stop


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_server(tiny):
    """make_server(**config) -> (base_url, app): a real uvicorn on 127.0.0.1 in a thread, with its own backend."""
    import threading

    import uvicorn

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import TorchBackend
    from slimlm.serve.config import ServeConfig

    running = []

    def make(max_len: int = 2048, **kw):
        kw.setdefault("served_model_name", "tiny")
        model, tok = tiny
        app = create_app(ServeConfig(model="tiny", **kw), backend=TorchBackend(model, tok, max_len=max_len),
                         tokenizer=tok)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started = threading.Event()
        for _ in range(1000):  # bounded wait for the socket to open
            if server.started:
                break
            started.wait(0.01)
        assert server.started, "uvicorn did not start"
        running.append((server, thread))
        return f"http://127.0.0.1:{port}", app

    yield make
    for server, thread in running:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="session")
def onnx_dir(serve_tiny_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    try:
        from slimlm.export import OnnxConfig, export_onnx
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"slimlm.export has no ONNX export here: {exc}")
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    export_onnx(str(serve_tiny_dir), out, OnnxConfig())
    return out


@pytest.fixture(scope="session")
def onnx_variants(serve_tiny_dir, onnx_dir, tmp_path_factory):
    """The default (fused attention) graph in fp32 and int8 (the server's CPU default), and the plain graph."""
    from slimlm.export import OnnxConfig, export_onnx

    root = tmp_path_factory.mktemp("onnx-variants")
    out = {"fp32": onnx_dir}
    for name, cfg in {"int8": OnnxConfig(weights="int8"), "plain": OnnxConfig(attention="plain")}.items():
        export_onnx(str(serve_tiny_dir), root / name, cfg)
        out[name] = root / name
    return out
