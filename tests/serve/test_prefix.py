"""The ONNX backend's prompt prefix cache (`slimlm.serve.prefix`) and its in-place batch rows: reuse never changes
a logit, the cache keeps its bounds, and what was reused is reported."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.serve.prefix import MIN_NEW, MIN_REUSE, PrefixCache


def _past(n: int, layers: int = 2, fill: float = 0.0):
    return [(np.full((1, 1, n, 2), fill + j, np.float32), np.full((1, 1, n, 2), -fill - j, np.float32))
            for j in range(layers)]


def test_lookup_takes_the_longest_shared_prefix_and_leaves_tokens_to_compute():
    cache = PrefixCache(2**20)
    cache.store(list(range(10)), _past(10, fill=1))
    cache.store([0, 1, 2, 3, 4, 5, 6, 99, 98], _past(9, fill=2))
    c, past = cache.lookup([0, 1, 2, 3, 4, 5, 6, 99, 98, 97, 96])
    assert c == 9 and past[0][0].shape == (1, 1, 9, 2) and float(past[0][0][0, 0, 0, 0]) == 2
    c, past = cache.lookup(list(range(12)))
    assert c == 10 and float(past[1][0][0, 0, 0, 0]) == 2  # the first entry, layer 1
    c, _ = cache.lookup(list(range(10)))  # the same prompt again: its last MIN_NEW tokens are computed
    assert c == 10 - MIN_NEW
    assert cache.lookup(list(range(MIN_REUSE - 1)) + [77] * 8) == (0, None)  # too little shared
    assert cache.lookup([5, 5, 5, 5, 5, 5]) == (0, None)
    stats = cache.stats()
    assert stats["lookups"] == 5 and stats["hits"] == 3 and stats["reused_tokens"] == 9 + 10 + 8


def test_reused_arrays_cannot_be_written_through():
    cache = PrefixCache(2**20)
    cache.store(list(range(8)), _past(8, fill=3))
    for ids in (list(range(8)) + [50, 51], list(range(6)) + [50, 51]):  # the whole entry, and a part of it
        _, past = cache.lookup(ids)
        assert past[0][0].flags.c_contiguous
        with pytest.raises(ValueError, match="read-only"):
            past[0][0][...] = -1
    assert float(cache.lookup(list(range(8)) + [50, 51])[1][0][0].min()) == 3


def test_eviction_keeps_the_bytes_bounded_and_prefixes_are_superseded():
    one = PrefixCache._nbytes(_past(10))
    cache = PrefixCache(3 * one)
    for i in range(5):
        cache.store([100 + i] + list(range(9)), _past(10))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.lookup([100] + list(range(9)) + [1, 2]) == (0, None)  # the oldest went first
    assert cache.lookup([104] + list(range(9)) + [1, 2])[0] == 10
    cache.store([104] + list(range(12)), _past(13))  # extends a cached prompt: the shorter entry goes
    # the 10-token entry it extends is dropped, then the oldest (102) to fit the longer one
    assert len(cache) == 2 and cache.bytes == one + PrefixCache._nbytes(_past(13))
    assert cache.lookup([104] + list(range(12)) + [1, 2])[0] == 13
    assert cache.lookup([103] + list(range(9)) + [1, 2])[0] == 10
    assert cache.lookup([102] + list(range(9)) + [1, 2]) == (0, None)
    big = PrefixCache(one // 2)
    big.store(list(range(10)), _past(10))  # larger than the whole budget: not kept
    assert len(big) == 0 and big.bytes == 0


@pytest.mark.parametrize("variant", ["fp32", "int8", "plain"])
def test_prefix_reuse_gives_the_logits_and_cache_of_a_whole_prefill(onnx_variants, variant):
    """A prompt that shares its beginning with an earlier one is prefilled from the cached prefix; its logits and
    its cache equal those of a backend with no prefix cache, bit for bit, and the reuse is reported."""
    import torch

    from slimlm.export import OnnxCausalLM
    from slimlm.serve.onnx_backend import OnnxBackend

    lm = OnnxCausalLM(onnx_variants[variant], threads=1)
    cached = OnnxBackend(lm, 256, prefix_cache_mb=16)
    assert cached.prefix is not None, cached.prefix_reason
    plain = OnnxBackend(lm, 256)
    assert plain.prefix is None and "off" in plain.prefix_reason
    system = [3, 17, 22, 9, 41, 8, 30, 12, 5]
    prompts = [system + [60, 61, 62], system + [70, 71], system + [60, 61, 62, 63, 64], system + [60, 61, 62]]
    reused = []
    for i, ids in enumerate(prompts):
        got = cached.prefill(i, ids)
        reused.append(cached.cached_prompt_tokens(i))
        want = plain.prefill(i, ids)
        assert torch.equal(got, want), (i, (got - want).abs().max())
        for (gk, gv), (wk, wv) in zip(cached.pending[i], plain.pending[i]):
            assert np.array_equal(gk, wk) and np.array_equal(gv, wv)
    assert reused == [0, len(system), len(system) + 3, len(system) + 3 - MIN_NEW]
    # and decoding after a reused prefix equals decoding after a whole prefill
    for backend in (cached, plain):
        for seq in (0, 1, 2):
            backend.release(seq)
    a = cached.decode([3], [7])
    b = plain.decode([3], [7])
    assert torch.equal(a, b)
    assert cached.info()["prefix_cache"]["hits"] == 3


def test_a_graph_that_splits_inexactly_gets_no_prefix_cache(onnx_dir, monkeypatch):
    from slimlm.export import OnnxCausalLM
    from slimlm.serve import prefix
    from slimlm.serve.onnx_backend import OnnxBackend

    lm = OnnxCausalLM(onnx_dir, threads=1)
    assert prefix.splits_exactly(lm)
    monkeypatch.setattr(prefix, "splits_exactly", lambda lm: False)
    backend = OnnxBackend(lm, 256, prefix_cache_mb=16)
    assert backend.prefix is None and "differs" in backend.prefix_reason
    backend.prefill(1, [4, 5, 6, 7, 8, 9])
    backend.prefill(2, [4, 5, 6, 7, 8, 9, 10])
    assert backend.cached_prompt_tokens(2) == 0 and "prefix_cache" not in backend.info()


def test_served_usage_reports_cached_prompt_tokens(onnx_dir):
    """A chat's second request shares the template's opening: usage says how many prompt tokens were cached
    (OpenAI's prompt_tokens_details.cached_tokens), the timings and /metrics count them, the text is unchanged."""
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    def serve(mb):
        cfg = ServeConfig(model=str(onnx_dir), backend="onnx", served_model_name="tiny", threads=1,
                          max_model_len=256, prefix_cache_mb=mb)
        backend, tok = load_backend(cfg)
        return TestClient(create_app(cfg, backend=backend, tokenizer=tok))

    base = "Once upon a time there was a river that ran"
    reqs = [{"prompt": base + " north", "max_tokens": 6, "temperature": 0},
            {"prompt": base + " south to the sea", "max_tokens": 6, "temperature": 0}]
    with serve(16) as client:
        first, second = (client.post("/v1/completions", json=r).json() for r in reqs)
        metrics = client.get("/metrics").text
    with serve(0) as client:
        texts = [client.post("/v1/completions", json=r).json()["choices"][0]["text"] for r in reqs]
    assert "prompt_tokens_details" not in first["usage"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]
    assert second["timings"]["cached_prompt_tokens"] == cached
    assert f"slimlm_prompt_tokens_cached_total {float(cached)}" in metrics
    assert [first["choices"][0]["text"], second["choices"][0]["text"]] == texts


def test_config_refuses_a_negative_prefix_cache_and_tiny_prompt_parts():
    from slimlm.errors import SlimlmError
    from slimlm.serve.config import ServeConfig

    with pytest.raises(SlimlmError, match="prefix_cache_mb"):
        ServeConfig(prefix_cache_mb=-1)
    for bad in (-1, 1, 15):
        with pytest.raises(SlimlmError, match="prefill_chunk"):
            ServeConfig(prefill_chunk=bad)
    assert ServeConfig(prefill_chunk=0).prefill_chunk == 0 and ServeConfig(prefill_chunk=16).prefill_chunk == 16


def test_in_place_rows_survive_joins_and_leaves_in_any_order(onnx_variants):
    """Sequences keep their rows in the in-place cache while others join and leave (a leaver's row is filled by
    the last row, so rows stop following the caller's order): every step's logits still equal each sequence's
    alone, bit for bit, returned in the caller's order, and the buffers are not reallocated for it."""
    import torch

    from slimlm.export import OnnxCausalLM
    from slimlm.serve.onnx_backend import OnnxBackend

    backend = OnnxBackend(OnnxCausalLM(onnx_variants["int8"], threads=1), 256)
    assert backend.in_place
    prompts = {0: [5, 9, 14, 30, 31, 40, 7], 1: [11, 12], 2: [50, 51, 52, 53], 3: [8, 8, 9]}

    def alone(ids, steps):
        backend.reset()
        rows = [backend.prefill(99, ids)]
        for _ in range(steps):
            rows.append(backend.decode([99], [int(rows[-1].argmax())])[0])
        backend.release(99)
        return torch.stack(rows)

    want = {s: alone(ids, 8) for s, ids in prompts.items()}
    backend.reset()
    got = {s: [backend.prefill(s, prompts[s])] for s in (0, 1, 2)}

    def step(live):
        out = backend.decode(live, [int(got[s][-1].argmax()) for s in live])
        for r, s in enumerate(live):
            got[s].append(out[r])

    step([0, 1, 2])
    cache = backend.cache
    backend.release(0)  # the first row leaves: the last row moves into it
    step([1, 2])
    assert backend.order == [2, 1] and backend.cache is cache
    got[3] = [backend.prefill(3, prompts[3])]
    step([3, 1, 2])  # joins in a spare row; the caller's order differs from the rows'
    step([3, 1, 2])
    assert backend.cache is cache
    backend.release(1)
    step([3, 2])
    for s in prompts:
        rows = torch.stack(got[s])
        assert torch.equal(rows, want[s][: len(rows)]), (s, (rows - want[s][: len(rows)]).abs().max())


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_a_prompt_prefilled_in_parts_equals_it_prefilled_whole(onnx_variants, variant):
    """prefill_part: parts of at most the budget, never leaving a single token for last (it would take the decode
    path); the logits and the cache equal a whole prefill's, bit for bit, with and without a cached prefix."""
    import torch

    from slimlm.export import OnnxCausalLM
    from slimlm.serve.onnx_backend import OnnxBackend

    lm = OnnxCausalLM(onnx_variants[variant], threads=1)
    parts = OnnxBackend(lm, 256, prefill_chunk=16, prefix_cache_mb=16)
    assert parts.prefill_chunk == 16 and parts.exact_splits
    whole = OnnxBackend(lm, 256)
    ids = [(7 * i) % 250 + 3 for i in range(37)]
    for seq, prompt in enumerate([ids, ids[:33] + [9, 9, 9, 9, 9]]):  # the second one begins with a cached prefix
        steps, last = [], None
        while last is None:
            last = parts.prefill_part(seq, prompt, 16)
            steps.append(parts.lengths[seq])
        want = whole.prefill(seq, prompt)
        assert torch.equal(last, want)
        for (gk, gv), (wk, wv) in zip(parts.pending[seq], whole.pending[seq]):
            assert np.array_equal(gk, wk) and np.array_equal(gv, wv)
        if seq == 0:
            assert steps == [16, 32, 37]
        else:
            assert parts.cached_prompt_tokens(seq) == 33 and steps == [38]
    fresh = OnnxBackend(lm, 256, prefill_chunk=16)
    assert fresh.prefill_part(5, ids[:17], 16) is not None and fresh.lengths[5] == 17  # 16 would leave 1 behind


def test_a_long_prompt_is_prefilled_between_decode_steps(onnx_variants):
    """With a sequence decoding, a long prompt is prefilled a part per step: the running stream keeps getting tokens
    meanwhile, and both answers are the tokens each gives alone."""
    import threading

    from slimlm.export import OnnxCausalLM
    from slimlm.serve.engine import Engine, GenRequest
    from slimlm.serve.onnx_backend import OnnxBackend
    from slimlm.serve.sampling import SamplingParams

    lm = OnnxCausalLM(onnx_variants["int8"], threads=1)
    short, long_ = [5, 9, 14, 30], [(11 * i) % 240 + 4 for i in range(90)]

    def run(backend, prompts, stagger):
        engine = Engine(backend, lm.tokenizer, max_batch=4)
        engine.start()
        log, done = [], [threading.Event() for _ in prompts]

        def sink(i):
            def f(event):
                log.append((i, event["type"]))
                if event["type"] in ("done", "error"):
                    done[i].set()
            return f

        reqs = []
        for i, ids in enumerate(prompts):
            reqs.append(engine.submit(GenRequest(list(ids), SamplingParams(temperature=0), 24, sink(i))))
            if stagger and i == 0:
                while sum(1 for j, t in log if j == 0 and t == "delta") < 3:  # the short one is decoding
                    threading.Event().wait(0.005)
        for d in done:
            assert d.wait(120)
        engine.stop()
        return [r.output_ids for r in reqs], log

    alone = [run(OnnxBackend(lm, 256), [p], False)[0][0] for p in (short, long_)]
    backend = OnnxBackend(lm, 256, prefill_chunk=16)
    outputs, log = run(backend, [short, long_], True)
    assert outputs == alone
    first_long = log.index((1, "delta"))
    # 90 tokens in parts of 16: six parts, a decode step of the short stream after each
    assert sum(1 for j, t in log[:first_long] if j == 0 and t == "delta") >= 3 + 5


def test_a_long_prompt_abandoned_between_its_parts_is_dropped_cleanly(onnx_variants):
    """A request whose client goes away while its prompt goes in part by part ends with 'abort', frees its
    partial cache, and the stream beside it finishes with its own tokens."""
    import threading

    from slimlm.export import OnnxCausalLM
    from slimlm.serve.engine import Engine, GenRequest
    from slimlm.serve.onnx_backend import OnnxBackend
    from slimlm.serve.sampling import SamplingParams

    lm = OnnxCausalLM(onnx_variants["int8"], threads=1)
    alone = OnnxBackend(lm, 256)
    engine = Engine(alone, lm.tokenizer, max_batch=4)
    engine.start()
    done = threading.Event()
    want = engine.submit(GenRequest([5, 9, 14, 30], SamplingParams(temperature=0), 40,
                                    lambda e: done.set() if e["type"] == "done" else None))
    assert done.wait(120)
    engine.stop()

    backend = OnnxBackend(lm, 256, prefill_chunk=16)
    engine = Engine(backend, lm.tokenizer, max_batch=4)
    engine.start()
    events = {0: [], 1: []}
    finished = {0: threading.Event(), 1: threading.Event()}

    def sink(i):
        def f(event):
            events[i].append(event)
            if event["type"] in ("done", "error"):
                finished[i].set()
        return f

    short = engine.submit(GenRequest([5, 9, 14, 30], SamplingParams(temperature=0), 40, sink(0)))
    while sum(e["type"] == "delta" for e in events[0]) < 2:
        threading.Event().wait(0.005)
    long_req = engine.submit(GenRequest([(13 * i) % 240 + 4 for i in range(200)], SamplingParams(temperature=0),
                                        8, sink(1)))
    while long_req.id not in backend.lengths and not finished[1].is_set():  # its first part is in
        threading.Event().wait(0.001)
    engine.abort(long_req)
    assert finished[1].wait(120) and finished[0].wait(120)
    engine.stop()
    assert events[1][-1]["type"] == "done" and events[1][-1]["finish_reason"] == "abort"
    assert not any(e["type"] == "delta" for e in events[1])
    assert long_req.id not in backend.lengths and long_req.id not in backend.pending
    assert short.output_ids == want.output_ids
