"""Evaluation: perplexity, multiple-choice loading and scoring, stability."""

import json
import math

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluate import MCExample, MCResult, load_mc, multiple_choice, perplexity, stability
from slimlm.models import load_model


def test_perplexity_matches_model_loss(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    windows = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert got["tokens"] == 45
    assert math.isclose(got["ppl"], math.exp(sum(losses) / 3), rel_tol=1e-4)


def test_next_token_logprobs_in_head_chunks_equal_full_logits(tiny_dir, monkeypatch):
    import slimlm.evaluate as ev

    model, _ = load_model(str(tiny_dir))
    ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        monkeypatch.setattr(ev, "LOGIT_ROWS", 5)  # 16 positions in 4 chunks, one of them partial
        logp, top1 = ev.next_token_logprobs(model, ids, attention_mask=mask, argmax=True)
    assert torch.allclose(logp, full.gather(-1, ids[:, 1:, None])[..., 0], atol=1e-5)
    assert torch.equal(top1, full.argmax(-1))


def test_pairs_longer_than_the_context_lose_the_start_of_their_context(tiny_dir, monkeypatch):
    import slimlm.evaluate as ev

    model, tok = load_model(str(tiny_dir))
    context, choice = "one two three four five six seven eight nine ten eleven twelve", " end"
    whole = tok(context + choice, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(tok(context, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(model.config, "max_position_embeddings", len(whole) - 3)
    got = ev._loglikelihoods(model, tok, [(context, choice)], batch_size=1, progress=False, desc="t")[0]
    kept = torch.tensor([whole[3:]])
    with torch.no_grad():
        want = float(ev.next_token_logprobs(model, kept)[0, -n_cont:].sum())
    assert math.isclose(got, want, rel_tol=1e-5)


def test_stability_sums_weights_of_agreeing_examples():
    ref = MCResult(acc=0.5, acc_norm=0.5, n=3, scores=[[0.0, -1.0], [0.0, -3.0], [-2.0, 0.0]],
                   correct=[True, False, True])
    model = MCResult(acc=0.5, acc_norm=0.5, n=3, scores=[[0, 0]] * 3, correct=[True, True, False])
    stds = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    w = torch.softmax(stds, 0)
    assert math.isclose(stability(model, ref), float(w[0]), rel_tol=1e-9)  # only example 0 agrees
    assert math.isclose(stability(ref, ref), 1.0, rel_tol=1e-9)


def test_load_piqa_siqa_and_generic(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"goal": "Open a jar", "sol1": "twist", "sol2": "sing"}) + "\n")
    (tmp_path / "p-labels.lst").write_text("0\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"context": "Kim ate.", "question": "Why?", "answerA": "hungry",
                                                  "answerB": "sad", "answerC": "late"}) + "\n")
    (tmp_path / "s-labels.lst").write_text("1\n")
    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "2+2=", "choices": ["4", "5"], "label": 0}) + "\n")
    p, s, g = load_mc(str(tmp_path / "p.jsonl")), load_mc(str(tmp_path / "s.jsonl")), load_mc(str(tmp_path / "g.jsonl"))
    assert p[0].context == "Question: Open a jar\nAnswer:" and p[0].choices == [" twist", " sing"] and p[0].label == 0
    assert s[0].label == 0 and len(s[0].choices) == 3
    assert g[0].choices == [" 4", " 5"]
    (tmp_path / "w.jsonl").write_text(json.dumps({"context": "Answer:\n", "choices": ["4", "5"], "label": 0}) + "\n"
                                      + json.dumps({"context": "x", "choices": [" 4", "5"], "label": 0}) + "\n"
                                      + json.dumps({"context": "", "choices": ["4", "5"], "label": 0}) + "\n")
    assert [ex.choices for ex in load_mc(str(tmp_path / "w.jsonl"))] == [["4", "5"], [" 4", " 5"], ["4", "5"]]
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["a", "b"], "label": 3}\n')
    with pytest.raises(SlimlmError, match="label 3"):
        load_mc(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(SlimlmError, match="not valid JSON"):
        load_mc(str(tmp_path / "broken.jsonl"))


@pytest.mark.parametrize("label,index", [(1, 1), ("1", 1), (" 2 ", 2), ("B", 1), ("c", 2)])
def test_generic_labels_as_index_digit_string_or_letter(tmp_path, label, index):
    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "q", "choices": ["a", "b", "c"], "label": label}) + "\n")
    assert load_mc(str(tmp_path / "g.jsonl"))[0].label == index


@pytest.mark.parametrize("row,match", [
    ({"context": "q", "choices": ["a", "b"], "label": None}, "label None"),
    ({"context": "q", "choices": ["a", "b"], "label": True}, "label True"),
    ({"context": "q", "choices": ["a", "b"], "label": "BB"}, "label 'BB'"),
    ({"context": "q", "choices": "ab", "label": 0}, "choices must be a list"),
    ({"context": "q", "choices": ["a"], "label": 0}, "at least 2"),
    ({"context": "q", "choices": ["a", " "], "label": 0}, "choice 2 is empty"),
    ({"goal": "g", "sol1": "", "sol2": "b", "label": 0}, "choice 1 is empty"),
    ({"context": 5, "choices": ["a", "b"], "label": 0}, "'context' must be a string"),
    ({"goal": "g", "sol1": "a", "sol2": None, "label": 0}, "'sol2' must be a string"),
    ({"context": "c", "question": "q", "answerA": "a", "answerB": "b", "label": "1"}, "'answerC' must be a string"),
    ({"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "A"}, "label 'A'"),
])
def test_malformed_rows_are_clear_errors(tmp_path, row, match):
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SlimlmError, match=match):
        load_mc(str(tmp_path / "m.jsonl"))


def test_non_integer_labels_file_is_a_clear_error(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    (tmp_path / "p-labels.lst").write_text("zero\n")
    with pytest.raises(SlimlmError, match="labels must be integers"):
        load_mc(str(tmp_path / "p.jsonl"))


@pytest.mark.parametrize("data, match", [
    ('{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n'.encode("latin-1"), "is not UTF-8 text"),
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
    (b'{"context": "c", "choices": ["a", "b"], "label": 0}\n\x00\x00\n', "is binary"),
])
def test_non_utf8_or_binary_files_are_clear_errors(tmp_path, capsys, tiny_dir, data, match):
    from slimlm.cli import main

    (tmp_path / "m.jsonl").write_bytes(data)
    with pytest.raises(SlimlmError, match=match):
        load_mc(str(tmp_path / "m.jsonl"))
    (tmp_path / "t.txt").write_bytes(data * 50)
    assert main(["eval", str(tiny_dir), "--ppl", str(tmp_path / "t.txt"), "--seq-len", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, match", [
    (["--mc", "a={g}", "--mc", "a={g}"], "--mc names must be unique: a given more than once"),
    (["--mc", "={g}"], "non-empty NAME"),
    (["--mc", "a={g}", "--json", "{d}"], "is a directory, not a file"),
])
def test_eval_cli_bad_sets_and_json(tiny_dir, tmp_path, capsys, extra, match):
    from slimlm.cli import main

    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "c", "choices": ["a", "b"], "label": 0}) + "\n")
    (tmp_path / "d").mkdir()
    args = [a.format(g=tmp_path / "g.jsonl", d=tmp_path / "d") for a in extra]
    assert main(["eval", str(tiny_dir), *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("bos", [False, True])
def test_multiple_choice_scores_are_continuation_loglikelihoods(tiny_dir, bos):
    """Scores are the continuation's log-likelihood after the context, as the tokenizer encodes a text: after BOS
    for a tokenizer that begins texts with it (Gemma), without for one that does not."""
    model, tok = load_model(str(tiny_dir))
    tok.add_bos_token = bos
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == bos
    ctx, choices = "the model reads", [" a river", " the hidden state", " quickly"]
    ex = [MCExample(ctx, choices, 1), MCExample("Question: why?\nAnswer:", [" because", " never"], 0)]
    r = multiple_choice(model, tok, ex, batch_size=2, progress=False)
    n_ctx = len(tok(ctx)["input_ids"])
    expected = []
    with torch.no_grad():
        for c in choices:
            ids = torch.tensor([tok(ctx + c)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            expected.append(sum(float(logp[i - 1, ids[0, i]]) for i in range(n_ctx, ids.shape[1])))
    assert r.scores[0] == pytest.approx(expected, abs=1e-4)
    assert r.correct[0] == (max(range(3), key=expected.__getitem__) == 1)
    assert r.n == 2 and r.acc == sum(r.correct) / 2


def test_eval_cli_json(tiny_dir, tmp_path, capsys, calib_file):
    from slimlm.cli import main

    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps({"context": f"the {w}", "choices": ["model", "river"],
                                                            "label": i % 2}) for i, w in enumerate("ab cd ef".split())))
    code = main(["eval", str(tiny_dir), "--ppl", str(calib_file), "--seq-len", "32", "--windows", "3",
                 "--mc", f"g={tmp_path / 'g.jsonl'}", "--reference", str(tiny_dir), "--json", str(tmp_path / "r.json"),
                 "--quiet"])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ppl"]["windows"] == 3 and res["mc"]["g"]["n"] == 3
    assert math.isclose(res["mc"]["g"]["stability"], 1.0)  # a model agrees with itself
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(tiny_dir)]) == 2
    assert main(["eval", str(tiny_dir), "--mc", "nofile"]) == 2
    assert main(["eval", str(tiny_dir), "--ppl", str(tmp_path)]) == 2
    assert "is a directory, not a text file" in capsys.readouterr().err


def test_next_token_logprobs_through_accelerate_offload(tiny_dir, tmp_path):
    """Under `--device-map auto` accelerate hooks move tensors between devices; with some layers offloaded to disk
    (the hooks a CPU-only machine can exercise) the decoder + chunked head path equals the model's own logits."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    import slimlm.evaluate as ev

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    n = plain.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(n)}}
    offloaded = AutoModelForCausalLM.from_pretrained(str(tiny_dir), device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert hasattr(offloaded.model.layers[1], "_hf_hook")  # really dispatched through accelerate
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.log_softmax(plain(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = ev.next_token_logprobs(offloaded, ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_eval_json_into_a_missing_directory_is_written(tiny_dir, tmp_path, capsys):
    from slimlm.cli import main

    (tmp_path / "g.jsonl").write_text(json.dumps({"context": "c", "choices": ["a", "b"], "label": 0}) + "\n")
    out = tmp_path / "new" / "sub" / "r.json"
    assert main(["eval", str(tiny_dir), "--mc", f"g={tmp_path / 'g.jsonl'}", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["mc"]["g"]["n"] == 1
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_windows_begin_with_bos_where_the_tokenizer_begins_texts_with_it(tiny_dir):
    from slimlm.data import bos_ids, token_windows

    _, tok = load_model(str(tiny_dir))
    text = "the model reads a river of hidden states, quickly and never twice " * 8
    stream = tok(text, add_special_tokens=False)["input_ids"]
    assert bos_ids(tok) == []
    plain = token_windows(tok, text, 3, 16)
    assert plain.flatten().tolist() == stream[:48]
    tok.add_bos_token = True
    assert bos_ids(tok) == [tok.bos_token_id]
    windows = token_windows(tok, text, 3, 16)
    assert windows.shape == (3, 16) and (windows[:, 0] == tok.bos_token_id).all()
    assert windows[:, 1:].flatten().tolist() == stream[:45]  # the text continues from window to window
