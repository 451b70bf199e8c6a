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
