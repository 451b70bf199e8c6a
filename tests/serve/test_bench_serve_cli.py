"""`slimlm bench serve` refuses bad input before measuring: exit 2, one line, no traceback, no report."""

import socket

import pytest

from slimlm.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra,message", [
    (["--bogus", "1"], "unrecognized arguments"),
    (["--requests", "-3"], "--requests"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--warmup", "-1"], "--warmup"),
    (["--timeout", "nan"], "--timeout"),
    (["--concurrency", "0,2"], "concurrency"),
])
def test_bad_flags(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "http://127.0.0.1:1", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "usage:" not in err


def test_url_without_scheme(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "localhost:8000"])
    assert exc.value.code == 2 and "http://" in capsys.readouterr().err


def test_unreachable_server_is_an_error_not_a_table(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "serve", f"http://127.0.0.1:{_closed_port()}", "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "cannot reach" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not out.exists()


def test_unwritable_json_is_refused_before_measuring(tmp_path, capsys):
    assert main(["bench", "serve", f"http://127.0.0.1:{_closed_port()}", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--launch", "x", "http://127.0.0.1:1"], "not both"),
    ([], "give server URLs or --launch"),
    (["http://127.0.0.1:1", "--peers", "none"], "go with --launch"),
    (["--launch", "no/such/model"], "no/such/model"),
    (["--launch", "smollm2-135m", "--peers", "ollama"], "unknown peer 'ollama'"),
])
def test_launch_bad_input_is_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setenv("SLIMLM_LLAMA_SERVER", "/no/such/binary")
    with pytest.raises(SystemExit) as exc:
        code = main(["bench", "serve", *args])
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_named_peer_that_is_missing_is_an_error(monkeypatch):
    from slimlm.errors import SlimlmError
    from slimlm.serve import bench_launch

    monkeypatch.setenv("SLIMLM_LLAMA_SERVER", "/no/such/binary")
    monkeypatch.setenv("SLIMLM_VLLM_PYTHON", "/no/such/python")
    with pytest.raises(SlimlmError, match="peer llama-server not found"):
        bench_launch.resolve_peers("llama-server")
    assert bench_launch.resolve_peers("auto") == ([], {
        "llama-server": "no SLIMLM_LLAMA_SERVER binary and no llama-server on PATH",
        "vllm": "vllm does not import here and SLIMLM_VLLM_PYTHON is not set"})
    assert bench_launch.resolve_peers("none") == ([], {})


def test_peer_command_lines(tmp_path, monkeypatch):
    from slimlm.serve import bench_launch

    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("SLIMLM_LLAMA_SERVER", str(binary))
    monkeypatch.setenv("SLIMLM_VLLM_PYTHON", "/usr/bin/python3")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert bench_launch.resolve_peers("auto")[0] == ["llama-server", "vllm"]
    cmds = bench_launch.commands("some/model", ["llama-server", "vllm"], threads=2, slots=8, work=tmp_path,
                                 gguf=str(gguf))
    assert list(cmds) == ["slimlm", "llama-server", "vllm"]
    argv, port, _ = cmds["llama-server"]
    assert argv[0] == str(binary) and argv[argv.index("-m") + 1] == str(gguf) and argv[argv.index("--port") + 1] == \
        str(port)
    assert argv[argv.index("-np") + 1] == "8" and argv[argv.index("-c") + 1] == "16384" and "-t" in argv
    assert cmds["slimlm"][0][-2:] == ["--threads", "2"] and cmds["slimlm"][0][3:5] == ["serve", "some/model"]
    assert cmds["vllm"][0][:3] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert len({c[1] for c in cmds.values()}) == 3  # a port each


def test_long_prompts_differ_and_are_long():
    from slimlm.serve.bench import long_prompts
    from slimlm.testing import tiny_tokenizer

    prompts = long_prompts(300, count=8)
    assert len(set(prompts)) == 8  # no two share a document: no prompt cache can serve one from another
    n = [len(tiny_tokenizer()(p)["input_ids"]) for p in prompts]
    assert min(n) >= 200  # the byte-level tiny tokenizer splits finer than a real one, so this is a floor


def test_every_request_of_a_level_sends_a_text_of_its_own(monkeypatch):
    """More requests than prompts, over two levels: the repeats are numbered, so no server answers one from a prompt
    cache filled by an earlier request of the run."""
    import asyncio

    from slimlm.serve import bench

    sent = []

    async def fake_one(http, url, model, prompt, max_tokens, endpoint, headers):
        sent.append(prompt)
        return {"ok": True, "ttft": 0.01, "e2e": 0.02, "tokens": 2, "itl": [0.01], "error": None}

    monkeypatch.setattr(bench, "_one", fake_one)
    n = 2 * len(bench.PROMPTS) + 1
    asyncio.run(bench._level("http://127.0.0.1:1", "m", 3, n, 4, "chat", {}, 5.0))
    asyncio.run(bench._level("http://127.0.0.1:1", "m", 2, 5, 4, "chat", {}, 5.0, offset=n))  # the next level
    assert len(sent) == n + 5 and len(set(sent)) == len(sent)
    assert all(any(p.endswith(q) for q in bench.PROMPTS) for p in sent)


def test_launch_measures_slimlm_serve(tmp_path, serve_tiny_dir, capsys):
    """--launch starts the server itself (and llama-server beside it where one is installed), measures, stops."""
    import json

    from slimlm.serve import bench_launch

    peers = "llama-server" if bench_launch.llama_server_binary() else "none"
    out = tmp_path / "r.json"
    code = main(["bench", "serve", "--launch", str(serve_tiny_dir), "--peers", peers, "--work", str(tmp_path),
                 "--concurrency", "2", "--requests", "2", "--max-tokens", "4", "--warmup", "0", "--threads", "1",
                 "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    servers = ["slimlm"] + ([peers] if peers != "none" else [])
    assert [r["server"] for r in result["rows"]] == servers and all(r["completed"] == 2 for r in result["rows"])
    assert set(result["launched"]) == set(servers)
    for name in servers:  # every server stopped with the run
        port = int(result["launched"][name]["argv"][result["launched"][name]["argv"].index("--port") + 1])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
