"""The CLI's contract for bad input: exit code 2, one line on stderr, no output directory."""

import os
import subprocess
import sys

import pytest

from slimlm.cli import main

FAST = ["--calib-samples", "4", "--seq-len", "16", "--epochs", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _calib(calib_file):
    FAST[:] = [a for a in FAST if a != "--calib" and not a.endswith(".txt")] + ["--calib", str(calib_file)]


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "6"], "cannot remove 6 of 6"),
        (["--layers", "60"], "cannot remove 60 of 6"),
        (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["--ratio", "0"], "--ratio must be in (0, 1)"),
        (["--layers", "2", "--lr", "inf"], "--lr must be positive and finite"),
        (["--layers", "2", "--lr", "nan"], "--lr must be positive and finite"),
        (["--layers", "2", "--kd-lr", "inf"], "--kd-lr must be positive and finite"),
        (["--layers", "2", "--kd-epochs", "-2"], "--kd-epochs must be >= 0, got -2"),
        (["--layers", "2", "--seed", str(2**64)], "--seed must fit in 64 bits"),
        (["--layers", "2", "--method", "magic"], "unknown method"),
        (["--layers", "2", "--replacement", "magic"], "unknown replacement"),
        (["--layers", "2", "--method", "shortgpt", "--replacement", "ffn"], "without a replacement"),
        (["--layers", "2", "--calib", "/nonexistent/calib.txt"], "calibration file not found"),
    ],
)
def test_bad_input_exits_2_without_output(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, err = _run(["compress", str(tiny_dir), "-o", str(out), *FAST, *extra], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "   \n", "is empty"),
    ("rows.jsonl", '{"id": 1, "score": 0.5}\n[1, 2]\n', "none of its 2 rows has a `text` or other string field"),
])
def test_calibration_file_without_text(tiny_dir, tmp_path, capsys, name, content, message):
    calib = tmp_path / name
    calib.write_text(content)
    code, err = _run(["compress", str(tiny_dir), "-o", str(tmp_path / "out"), "--layers", "2", *FAST,
                      "--calib", str(calib)], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, message", [(b"caf\xe9 cr\xe8me " * 200, "is not UTF-8 text (byte 0xe9 at offset 3)"),
                                           (b"text\x00" * 200, "is binary")])
def test_calibration_file_that_is_not_utf8_text(tiny_dir, tmp_path, capsys, data, message):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(data)
    code, err = _run(["compress", str(tiny_dir), "-o", str(tmp_path / "out"), "--layers", "2", *FAST,
                      "--calib", str(calib)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hf_calibration_without_datasets_names_the_package(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    code, err = _run(["compress", str(tiny_dir), "-o", str(tmp_path / "out"), "--layers", "2", *FAST,
                      "--calib", "hf:wikitext"], capsys)
    assert code == 2 and "pip install datasets" in err and "slimlm[dev]" not in err


def test_unknown_model_and_unsupported_architecture(tmp_path, capsys):
    code, err = _run(["compress", "no-such-model", "-o", str(tmp_path / "o"), "--layers", "1"], capsys)
    assert code == 2 and "unknown model" in err
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    code, err = _run(["compress", str(tmp_path / "gpt"), "-o", str(tmp_path / "o"), "--layers", "1"], capsys)
    assert code == 2 and "unsupported architecture 'gpt2'" in err


def test_unreachable_hub_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimlm", "compress", "nobody/nothing-here", "-o", str(tmp_path / "o"),
                           "--layers", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "cannot load 'nobody/nothing-here'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tiny_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = _run(["compress", str(tiny_dir), "-o", str(locked / "out"), "--layers", "2", *FAST], capsys)
    assert code == 2 and "cannot write" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where not even root creates files")
def test_unwritable_out_fails_before_any_work(tiny_dir, monkeypatch, capsys):
    import slimlm.compress

    def must_not_run(*args, **kwargs):
        raise AssertionError("compress ran although OUT cannot be written")

    monkeypatch.setattr(slimlm.compress, "compress", must_not_run)
    code, err = _run(["compress", str(tiny_dir), "-o", "/proc/slimlm-out", "--layers", "2", *FAST], capsys)
    assert code == 2 and "cannot write to /proc/slimlm-out" in err
    assert len(err.strip().splitlines()) == 1


def test_out_under_a_file_is_refused(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(["compress", str(tiny_dir), "-o", str(blocker / "out"), "--layers", "2", *FAST], capsys)
    assert code == 2 and "cannot write" in err
    assert blocker.read_text() == "x"


def test_existing_out_needs_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["compress", str(tiny_dir), "-o", str(out), "--layers", "2", *FAST], capsys)
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _ = _run(["compress", str(tiny_dir), "-o", str(out), "--layers", "2", "--force", *FAST], capsys)
    assert code == 0
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_failure_midway_leaves_no_output(tiny_dir, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    out = tmp_path / "out"
    code, err = _run(["compress", str(tiny_dir), "-o", str(out), "--layers", "2", *FAST], capsys)
    assert code == 1 and "disk on fire" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_console_script_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "slimlm", "compress", str(tiny_dir), "-o", str(out), "--layers", "2",
                           "--replacement", "linear", *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "removed layers [2, 3]" in proc.stdout
    assert "quality kept" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "slimlm", "compress", str(tiny_dir), "-o", str(out), "--layers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "already exists" in bad.stderr


@pytest.mark.parametrize("command", [["compress"], ["quantize"], ["export", "onnx"]])
@pytest.mark.parametrize("where, message", [("model", "is the model"), ("model/sub", "is inside the model"),
                                            (".", "contains the model"), ("file", "is not a directory")])
def test_out_that_would_destroy_the_model_or_a_file_is_refused(tiny_dir, tmp_path, capsys, command, where, message):
    import shutil

    model = shutil.copytree(tiny_dir, tmp_path / "model")
    (tmp_path / "file").write_text("mine")
    before = sorted(p.name for p in model.iterdir())
    code, err = _run([*command, str(model), "-o", str(tmp_path / where), "--force",
                      *(["--layers", "2", *FAST] if command == ["compress"] else [])], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in model.iterdir()) == before and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("argv", [
    ["compress", "m", "-o", "o", "--layers", "0"],
    ["compress", "m"],
    ["eval", "m", "--windows", "-1"],
    ["eval", "m", "--limit", "many"],
    ["quantize", "m", "-o", "o", "--windows", "x"],
    ["export", "onnx", "m", "-o", "o", "--opset", "1.5"],
    ["export"],
    ["bench", "nope"],
    ["bench", "compress", "--ppl", "t.txt", "--windows", "x"],
    ["bench", "export", "--repeats", "x"],
])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"garbage", "cannot load model from"),
    ("slimlm.json", b"[1, 2]", "is not a slimlm record"),
    ("slimlm.json", b'{"architecture": {"ffn_layers": [99]}}', "ffn_layers must list layer indices below 6"),
    ("slimlm.json", b"\xff", "is not valid JSON"),
])
def test_corrupt_model_directory_is_one_line(tiny_dir, tmp_path, capsys, calib_file, name, content, message):
    import shutil

    model = shutil.copytree(tiny_dir, tmp_path / "model")
    (model / name).write_bytes(content)
    code, err = _run(["eval", str(model), "--ppl", str(calib_file), "--seq-len", "16", "--quiet"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", [
    ["compress", "{model}", "-o", "{tmp}/out", "--layers", "2", "--calib", "{calib}", "--quiet"],
    ["eval", "{model}", "--ppl", "{calib}", "--quiet"],
])
def test_seq_len_beyond_the_model_context_is_refused(tiny_dir, tmp_path, capsys, calib_file, command):
    args = [a.format(model=tiny_dir, tmp=tmp_path, calib=calib_file) for a in command]
    code, err = _run([*args, "--seq-len", "4096"], capsys)
    assert code == 2 and "--seq-len 4096 is longer than the model's context (2048 positions)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"), ("meta", "unknown device 'meta'"),
                                             ("cuda:99", "'cuda:99'")])
def test_bad_device_is_refused_before_loading(tiny_dir, tmp_path, capsys, device, message):
    code, err = _run(["compress", str(tiny_dir), "-o", str(tmp_path / "out"), "--layers", "2", *FAST,
                      "--device", device], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
