"""The batched sampling loop of self-calibration and on-policy recovery, and the shared nucleus filter."""

import pytest
import torch

from slimlm.generate import generate_batch, nucleus, sample_rows
from slimlm.models import load_model


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) probabilities with the tokens outside each row's nucleus zeroed: the plain sort-everything way."""
    values, order = torch.sort(probs, dim=-1, descending=True)
    cut = (values.cumsum(-1) - values) >= top_p
    cut[:, 0] = False
    return torch.zeros_like(probs).scatter_(1, order, values.masked_fill(cut, 0.0))


def scatter_back(ids, kept, vocab):
    return torch.zeros(ids.shape[0], vocab).scatter_(1, ids, kept)


@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.99])
def test_nucleus_equals_sorting_the_whole_vocabulary(top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 300) * torch.tensor([0.01, 1.0, 4.0, 8.0]).repeat(4)[:, None]  # flat to peaked rows
    probs = torch.softmax(logits, dim=-1)
    ids, kept = nucleus(probs, top_p, candidates=8)  # flat rows need more than 8 and more than 64 candidates
    assert torch.allclose(scatter_back(ids, kept, 300), full_sort_nucleus(probs, top_p))
    assert (kept[:, 0] > 0).all()  # the most likely token always stays


def test_nucleus_stays_within_the_candidates_when_they_hold_top_p():
    probs = torch.softmax(torch.tensor([[9.0, 8.0, 7.0] + [0.0] * 100]), dim=-1)
    ids, kept = nucleus(probs, 0.9, candidates=4)
    assert ids.shape[-1] == 4 and ids[0, :3].tolist() == [0, 1, 2]


def test_sample_rows_draws_from_the_tempered_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = logits.repeat(20000, 1)
    tokens = sample_rows(rows, temperature=1.0, top_p=0.85, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[3] == 0  # outside the nucleus: the 0.95 above it reaches 0.85
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.015)
    again = sample_rows(rows[:50], 1.0, 0.85, torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_rows(rows[:50], 1.0, 0.85, torch.Generator().manual_seed(0)))
    assert torch.equal(sample_rows(rows[:3], 0.0), torch.zeros(3, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    return model, tokenizer


def left_padded(tokenizer, rows: int = 5):
    torch.manual_seed(1)
    lengths = [[3, 7, 5, 1, 6][i % 5] for i in range(rows)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 200, (n,))
        mask[row, -n:] = 1
    return ids, mask, pad


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(tiny, penalty):
    model, tokenizer = tiny
    ids, mask, pad = left_padded(tokenizer)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         repetition_penalty=penalty, pad_token_id=pad, eos_token_id=None)
    got = generate_batch(model, ids, mask, 12, repetition_penalty=penalty)
    assert [g.tolist() for g in got] == ref[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("rows", [5, 24])  # 24: an ended row idles until two more have ended
def test_rows_end_at_their_first_stop_token_and_leave_the_batch(tiny, rows):
    model, tokenizer = tiny
    ids, mask, _ = left_padded(tokenizer, rows)
    full = generate_batch(model, ids, mask, 16)
    # stop tokens that end some rows early, at different steps, and leave others running to the length limit
    stops = torch.tensor(sorted({int(full[0][2]), int(full[2][5])}))
    counted = []
    got = generate_batch(model, ids, mask, 16, stops=stops, on_step=counted.append)
    ended = 0
    for g, f in zip(got, full):
        hits = torch.isin(f, stops).nonzero()
        cut = int(hits[0]) + 1 if len(hits) else len(f)
        ended += bool(len(hits))
        assert g.tolist() == f[:cut].tolist()
    assert ended >= 1 and sum(counted) == sum(len(g) for g in got)


def test_the_servers_sampler_draws_from_the_same_nucleus():
    from slimlm.serve.sampling import Sampler, SamplingParams

    logits = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.05, 0.05]))
    for seed in range(40):
        greedy_like = Sampler(SamplingParams(temperature=1.0, top_p=0.0, seed=seed), [], vocab=5)
        assert greedy_like(logits)[0] == 1  # top_p 0 keeps the most likely token only
        two = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=seed), [], vocab=5)
        assert two(logits)[0] in (1, 2)  # 0.5 above token 2 is below 0.7; 0.8 above token 0 is not
