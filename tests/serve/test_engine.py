"""The engine without HTTP: continuous batching gives the same greedy tokens as running alone, FFN slots
(empty cache layers) batch correctly, sampling is reproducible with a seed, stop strings cut the text."""

from __future__ import annotations

import copy
import threading

import pytest

from slimlm.serve.engine import Engine, GenRequest, QueueFull, _find_stop, _safe_end
from slimlm.serve.sampling import Sampler, SamplingParams

PROMPTS = [f"Question {i}: how do you boil water? " * (1 + i % 3) for i in range(8)]
WAIT_S = 120  # bound on any wait for the engine thread; never reached when things work


def run_all(engine: Engine, tok, prompts, params=None, max_tokens=24, stop=None) -> list[dict]:
    """Submit all prompts at once; return per request {"ids", "text", "done"}."""
    results = [{"ids": [], "text": "", "done": None} for _ in prompts]
    events = [threading.Event() for _ in prompts]

    def sink(i):
        def f(ev):
            if ev["type"] == "delta":
                results[i]["ids"] += ev["token_ids"]
                results[i]["text"] += ev["text"]
            else:
                results[i]["done"] = ev
                events[i].set()
        return f

    for i, p in enumerate(prompts):
        engine.submit(GenRequest(tok.encode(p), params or SamplingParams(temperature=0), max_tokens, sink(i),
                                 list(stop or [])))
    for e in events:
        assert e.wait(WAIT_S)
    return results


@pytest.fixture
def engine(backend, tiny):
    eng = Engine(backend, tiny[1], max_batch=8, max_queue=8)
    eng.start()
    yield eng
    eng.stop()


def test_batch_equals_sequential(engine, tiny):
    tok = tiny[1]
    alone = [run_all(engine, tok, [p])[0] for p in PROMPTS]
    together = run_all(engine, tok, PROMPTS)
    assert engine.max_batch_seen > 1, "the requests never shared a batch"
    for a, b in zip(alone, together):
        assert a["ids"] == b["ids"]
        assert a["text"] == b["text"]
        assert a["done"]["finish_reason"] == b["done"]["finish_reason"]


def test_ffn_slot_batches(tiny):
    """A compressed model whose layer 2 is an FFN replacement (no KV cache in that slot)."""
    from slimlm.models import FFNLayer, make_ffn
    from slimlm.serve.backends import TorchBackend

    model, tok = tiny
    model = copy.deepcopy(model)
    layer = model.model.layers[2]
    ffn = make_ffn(model.config, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight,
                   layer.post_attention_layernorm.weight)
    model.model.layers[2] = FFNLayer(ffn, 2)
    backend = TorchBackend(model, tok, max_len=256)
    eng = Engine(backend, tok, max_batch=8)
    eng.start()
    try:
        alone = [run_all(eng, tok, [p])[0] for p in PROMPTS[:4]]
        together = run_all(eng, tok, PROMPTS[:4])
    finally:
        eng.stop()
    assert [a["ids"] for a in alone] == [b["ids"] for b in together]
    assert backend.info()["ffn_layers"] == [2]
    assert backend.info()["ffn_paths"] == ["reference"]


def test_late_arrivals_join_the_batch(engine, tiny):
    """Requests submitted while others decode share steps with them and still match their solo output."""
    tok = tiny[1]
    solo = run_all(engine, tok, PROMPTS[:2], max_tokens=40)
    results = [None, None]
    done = threading.Event()
    started = threading.Event()

    def sink_first(ev):
        if ev["type"] == "delta" and not started.is_set():
            started.set()
        if ev["type"] == "done":
            done.set()

    first = GenRequest(tok.encode(PROMPTS[0]), SamplingParams(temperature=0), 40, sink_first)
    engine.submit(first)
    assert started.wait(WAIT_S)
    results = run_all(engine, tok, PROMPTS[1:2], max_tokens=40)
    assert done.wait(WAIT_S)
    assert first.output_ids == solo[0]["ids"]
    assert results[0]["ids"] == solo[1]["ids"]


def test_seed_reproducible(engine, tiny):
    tok = tiny[1]
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = run_all(engine, tok, PROMPTS[:1], params=p)[0]["ids"]
    b = run_all(engine, tok, PROMPTS[:1], params=SamplingParams(**p.__dict__))[0]["ids"]
    c = run_all(engine, tok, PROMPTS[:1], params=SamplingParams(**{**p.__dict__, "seed": 99}))[0]["ids"]
    assert a == b
    assert a != c


def test_stop_string_cuts_text(engine, tiny, pick_stop):
    tok = tiny[1]
    params = SamplingParams(temperature=1.0, seed=7)  # the random model's greedy text is one repeated character
    text = run_all(engine, tok, ["Once upon a time"], params=params, max_tokens=30)[0]["text"]
    stop = pick_stop(text)
    cut = run_all(engine, tok, ["Once upon a time"], params=SamplingParams(temperature=1.0, seed=7), max_tokens=30,
                  stop=["never-appears", stop])[0]
    assert cut["done"]["finish_reason"] == "stop"
    assert cut["text"] == text[:text.index(stop)]
    assert stop not in cut["text"]


def test_length_finish_and_usage(engine, tiny):
    tok = tiny[1]
    r = run_all(engine, tok, PROMPTS[:1], max_tokens=5)[0]
    assert r["done"]["finish_reason"] == "length"
    assert len(r["ids"]) == 5
    usage = r["done"]["usage"]
    assert usage == {"prompt_tokens": len(tok.encode(PROMPTS[0])), "completion_tokens": 5,
                     "total_tokens": len(tok.encode(PROMPTS[0])) + 5}
    t = r["done"]["timings"]
    assert t["ttft_ms"] >= t["queue_ms"] >= 0
    assert t["e2e_ms"] >= t["ttft_ms"]
    assert t["completion_tokens"] == 5 and t["peak_memory_mb"] > 0


def test_queue_full(backend, tiny):
    eng = Engine(backend, tiny[1], max_batch=1, max_queue=1)  # not started: nothing leaves the line
    tok = tiny[1]

    def req():
        return GenRequest(tok.encode("hi"), SamplingParams(temperature=0), 4, lambda ev: None)

    eng.submit(req())
    eng.submit(req())
    with pytest.raises(QueueFull):
        eng.submit(req())


def test_abort_frees_the_slot(engine, tiny):
    tok = tiny[1]
    got_token = threading.Event()
    done = {}
    finished = threading.Event()

    def sink(ev):
        if ev["type"] == "delta":
            got_token.set()
        else:
            done.update(ev)
            finished.set()

    req = GenRequest(tok.encode(PROMPTS[0]), SamplingParams(temperature=0), 200, sink)
    engine.submit(req)
    assert got_token.wait(WAIT_S)
    engine.abort(req)
    assert finished.wait(WAIT_S)
    assert done["finish_reason"] == "abort"
    assert len(req.output_ids) < 200
    assert run_all(engine, tok, PROMPTS[:1], max_tokens=3)[0]["done"]["finish_reason"] == "length"
    assert engine.wait_idle(WAIT_S)
    assert engine.num_running == 0


def test_stop_helpers():
    assert _find_stop("hello world", ["wor"], 0) == 6
    assert _find_stop("hello world", ["xyz"], 0) is None
    assert _safe_end("hello wo", ["world"]) == len("hello ")
    assert _safe_end("abc\ufffd", []) == 3


def test_sampler_filters():
    import torch

    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    greedy = Sampler(SamplingParams(temperature=0, logprobs=2), [], 4)
    tok, lp, top = greedy(logits)
    assert tok == 3 and top[0][0] == 3 and abs(lp - float(torch.log_softmax(logits, -1)[3])) < 1e-6
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0), [], 4)
    assert {top1(logits)[0] for _ in range(20)} == {3}
    minp = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0), [], 4)
    assert {minp(logits)[0] for _ in range(50)} <= {2, 3}
    pen = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), [], 4)
    assert [pen(logits)[0] for _ in range(2)] == [3, 2]  # after one pick token 3 scores 3 - 2 = 1 < 2
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_abort_while_waiting_frees_capacity(backend, tiny):
    tok = tiny[1]
    eng = Engine(backend, tok, max_batch=1, max_queue=1)  # not started: requests stay in line
    events = []
    first = eng.submit(GenRequest(tok.encode("hi"), SamplingParams(temperature=0), 4, events.append))
    eng.submit(GenRequest(tok.encode("hi"), SamplingParams(temperature=0), 4, lambda ev: None))
    with pytest.raises(QueueFull):
        eng.submit(GenRequest(tok.encode("hi"), SamplingParams(temperature=0), 4, lambda ev: None))
    eng.abort(first)
    assert events and events[-1]["finish_reason"] == "abort"
    eng.submit(GenRequest(tok.encode("hi"), SamplingParams(temperature=0), 4, lambda ev: None))
    assert eng.num_waiting == 2


def test_prefill_many_matches_solo(tiny):
    """Left-padded batched prefill: each row's logits and cache match the prompt prefilled alone."""
    import torch

    from slimlm.serve.backends import TorchBackend

    model, tok = tiny
    backend = TorchBackend(model, tok, max_len=256)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    assert len({len(p) for p in prompts}) == 3  # different lengths, so rows are padded
    together = backend.prefill_many([(i, p) for i, p in enumerate(prompts)])  # (B, V)
    caches = {i: backend.pending[i] for i in range(3)}
    backend.reset()
    for i, p in enumerate(prompts):
        alone = backend.prefill(100 + i, p)
        err = (together[i] - alone).abs().max().item()
        assert err < 1e-5, f"row {i}: max abs logit error {err:.3g}"
        assert int(together[i].argmax()) == int(alone.argmax())
        for layer_b, layer_a in zip(caches[i], backend.pending[100 + i]):
            assert torch.allclose(layer_b[0], layer_a[0], atol=1e-5)  # keys; fp32 reduction order differs
            assert torch.allclose(layer_b[1], layer_a[1], atol=1e-5)  # values


def test_torch_backend_passes_the_cache_under_the_current_name(backend):
    """transformers 5.24 renamed the cache argument (`past_key_values` -> `cache`) and warns on the old one, which
    goes away in 5.40: the backend must use whichever name the installed release has."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        backend.prefill(9001, [5, 6, 7])
        logits = backend.decode([9001], [8])
        backend.release(9001)
    assert logits.shape[0] == 1
    assert not [w for w in seen if "past_key_values" in str(w.message)]


class _ScriptedBackend:
    """A backend whose greedy choice is a fixed token script, so a test controls exactly which tokens come out."""

    max_len = 256

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab_size, self.pos = script, vocab, {}

    def reset(self):
        self.pos.clear()

    def release(self, seq_id):
        self.pos.pop(seq_id, None)

    def _row(self, seq_id):
        import torch

        k = self.pos.get(seq_id, 0)
        self.pos[seq_id] = k + 1
        row = torch.zeros(self.vocab_size)  # (V,)
        row[self.script[min(k, len(self.script) - 1)]] = 10.0
        return row

    def prefill(self, seq_id, prompt_ids):
        return self._row(seq_id)

    def decode(self, seq_ids, tokens):
        import torch

        return torch.stack([self._row(i) for i in seq_ids])  # (B, V)


@pytest.mark.parametrize("stop,expected", [(None, "aé😀b"), ("é", "a"), ("😀", "aé"), ("😀b", "aé")])
def test_characters_split_across_tokens(tiny, stop, expected):
    """The byte-level tokenizer spells é and 😀 over several tokens: no U+FFFD is ever sent, and a stop string that
    starts with such a character is found (the text held back as U+FFFD becomes it later)."""
    tok = tiny[1]
    ids = tok.encode("aé😀b")
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the characters are no longer split: pick others"
    eng = Engine(_ScriptedBackend(ids + [tok.eos_token_id], len(tok)), tok, eos_ids=[tok.eos_token_id])
    eng.start()
    try:
        r = run_all(eng, tok, ["x"], max_tokens=50, stop=[stop] if stop else None)[0]
    finally:
        eng.stop()
    assert r["text"] == expected and r["done"]["finish_reason"] == "stop"
    assert "\ufffd" not in r["text"]


def test_text_stream_equals_decoding_whole(tiny):
    """The incremental text is, after every token, the whole output decoded, short only of a tail with an unfinished
    character (random ids: split characters, special tokens, spaces), and `final` is the whole decode."""
    import random

    from slimlm.serve.engine import TextStream

    tok = tiny[1]
    text = "Héllo wörld 😀 日本語 , . the end\n\n  spaces"
    pool = sorted(set(tok.encode(text)) | set(tok.all_special_ids) | set(range(len(tok))))
    rng = random.Random(0)
    for trial in range(30):
        ids = tok.encode(text) if trial == 0 else [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        stream = TextStream(tok)
        assert stream.stream is not None  # the fast path is what is tested
        for k in range(1, len(ids) + 1):
            whole = tok.decode(ids[:k], skip_special_tokens=True)
            got = stream.add(ids[k - 1], ids[:k])
            # what is not out yet waits for an unfinished character (with the rest of the token that began it)
            assert whole.startswith(got) and (got == whole or "\ufffd" in whole[len(got):]), (ids[:k], got, whole)
        assert stream.final(ids) == tok.decode(ids, skip_special_tokens=True)


def test_length_cut_inside_a_character_ends_as_decoded_whole(tiny):
    """A generation cut by max_tokens in the middle of a character's bytes ends with the text the whole output
    decodes to (its U+FFFD included), as before the text was decoded incrementally."""
    tok = tiny[1]
    ids = tok.encode("a😀")
    cut = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith("\ufffd"))
    eng = Engine(_ScriptedBackend(ids, len(tok)), tok, eos_ids=[tok.eos_token_id])
    eng.start()
    try:
        r = run_all(eng, tok, ["x"], max_tokens=cut)[0]
    finally:
        eng.stop()
    assert r["done"]["finish_reason"] == "length"
    assert r["text"] == tok.decode(ids[:cut], skip_special_tokens=True)
