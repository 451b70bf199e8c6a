"""`slimlm eval --chat`: loop and end detection on planted answers, the file format, the CLI end to end."""

import json

import pytest

from slimlm.chat_eval import chat_figures, is_loop, load_chat, loop_span, repeated_share
from slimlm.cli import main
from slimlm.errors import SlimlmError


@pytest.mark.parametrize("tokens, loops", [
    ([5, 6, 7] + [9] * 12, True),                               # one token over and over
    ([1, 2, 3] + [4, 5, 6, 7] * 4, True),                       # a short unit, 4 times
    (list(range(30)) + list(range(10, 30)) * 2, True),          # a 20-token sentence, twice at the end
    ([1, 2, 3, 4] * 2, False),                                  # too short to call a loop
    ([3, 3, 3, 7], False),                                      # "!!!" then more: a short run, not a loop
    (list(range(40)), False),                                   # no repeat
    ([1, 2] * 8 + list(range(20, 40)), False),                  # a loop in the middle that the answer left
])
def test_loop_detection_on_planted_answers(tokens, loops):
    assert (loop_span(tokens) > 0) == loops


def test_near_loops_count_and_ended_answers_do_not():
    sentence = list(range(10, 24))
    near = list(range(40)) + (sentence + [7]) * 2 + sentence[:-1] + [8] + sentence  # repeats with one word changed
    assert repeated_share(near) >= 0.6 and repeated_share(list(range(80))) == 0
    assert is_loop({"answer_ids": near, "ended": False})
    assert not is_loop({"answer_ids": near, "ended": True})  # it stopped: repetitive, but not a loop
    assert not is_loop({"answer_ids": list(range(100)), "ended": False})  # cut by the budget, no repeat


def test_figures_count_loops_endings_and_length():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    answers = [{"prompt_ids": [1], "answer_ids": [7] * 20, "ended": False},
               {"prompt_ids": [1], "answer_ids": [4, 5, 6], "ended": True},
               {"prompt_ids": [1], "answer_ids": list(range(10)), "ended": True},
               {"prompt_ids": [1], "answer_ids": [1, 2, 3] * 6 + [8], "ended": True},
               {"prompt_ids": [1], "answer_ids": [5] + [1, 2, 3] * 6, "ended": True}]
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    fig = chat_figures(answers, Tok(), convs)
    assert fig["n"] == 5 and fig["end_rate"] == 0.8 and fig["loop_rate"] == 0.2  # an answer that ended is no loop
    assert fig["mean_tokens"] == (20 + 3 + 10 + 19 + 19) / 5
    assert [e["loop"] for e in fig["examples"]] == [True, False, False, False]
    assert fig["answers"][1] == "4 5 6"


def test_chat_file_formats_and_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"instruction": "Hi"}\n\n{"prompt": "Yo", "system": "Be brief."}\n'
                    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},'
                    ' {"role": "user", "content": "c"}]}\n')
    convs = load_chat(str(good))
    assert [len(c) for c in convs] == [1, 2, 3] and convs[1][0]["role"] == "system"
    assert len(load_chat(str(good), limit=2)) == 2
    for text, message in (("{}", "needs a non-empty"), ("[1]", "expected a JSON object"), ("{bad", "not valid JSON"),
                          ('{"messages": [{"role": "assistant", "content": "x"}]}', "ending with a user turn"),
                          ("", "has no instructions")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(SlimlmError, match=message):
            load_chat(str(bad))
    with pytest.raises(SlimlmError, match="not found"):
        load_chat(str(tmp_path / "missing.jsonl"))


def test_eval_chat_cli_against_itself(tiny_dir, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in ("Boil water?", "A fox?", "Name a city.")))
    out = tmp_path / "eval.json"
    code = main(["eval", str(tiny_dir), "--chat", str(chat), "--chat-max-tokens", "12", "--reference", str(tiny_dir),
                 "--json", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "chat loop rate" in table and "chat reference NLL / token" in table
    c = json.loads(out.read_text())["chat"]
    assert c["n"] == 3 and c["max_new_tokens"] == 12 and all(e["answer"] is not None for e in c["examples"])
    assert 0 <= c["loop_rate"] <= 1 and 0 <= c["end_rate"] <= 1 and 0 < c["mean_tokens"] <= 12
    # the reference is the model itself: same greedy answers, so the same figures and the same NLL
    ref = c["reference"]
    assert ref["mean_tokens"] == c["mean_tokens"] and ref["loop_rate"] == c["loop_rate"]
    assert ref["reference_nll"] == pytest.approx(c["reference_nll"], rel=1e-5) and c["reference_nll"] > 0


def test_eval_chat_bad_budget_is_one_line(tiny_dir, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"instruction": "x"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tiny_dir), "--chat", str(chat), "--chat-max-tokens", "0"])
    code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
