"""The generation engine: continuous batching in one dedicated thread.

Iteration-level scheduling: every step the engine (1) admits waiting requests while the batch has room,
prefilling each and sampling its first token (a long prompt, where the backend can take it in parts
(`prefill_part`) and others are decoding, goes in one part per step instead), (2) drops finished or abandoned
sequences, (3) decodes one token for every running sequence in one batched backend call. A request that arrives
while others decode joins at the next step; one that finishes or whose client went away leaves at the next step.
The asyncio event loop never runs model code: it submits `GenRequest`s and receives events through
each request's `sink` callback (called from the engine thread).

Events, as dicts: {"type": "delta", "text", "token_ids", "logprobs"}, then exactly one of
{"type": "done", "finish_reason", "usage", "timings"} or {"type": "error", "message"}. A request that asks for
prompt logprobs first gets {"type": "prompt", "logprobs"}: one entry per prompt token, None for the first (nothing
predicts it). A request with `max_tokens` 0 (an echo that scores the prompt) generates nothing: it is done after
its prefill.
"""

from __future__ import annotations

import collections
import itertools
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from slimlm.serve.sampling import Sampler, SamplingParams

log = logging.getLogger("slimlm.serve")

# Most padded prompt tokens prefilled in one forward. On CPU a prompt of a few dozen tokens is already
# compute-bound, so batching longer prompts adds little throughput and delays every first token of the group
# until the whole group is done (SmolLM2-135M on 2 shared cores, concurrency 8, 37-token chat prompts: p50 TTFT
# 1.84 s with a 4096-token budget, 1.09 s with 64); short prompts, which mostly read weights, share a forward.
PREFILL_TOKENS = 64


class QueueFull(Exception):
    """The waiting line is full (HTTP 429)."""


class NotAccepting(Exception):
    """The engine is draining or stopped (HTTP 503)."""


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


@dataclass
class GenRequest:
    """One generation: the prompt, how to sample, when to stop, and where events go."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    sink: Callable[[dict], None]
    stop: list[str] = field(default_factory=list)
    prompt_logprobs: int | None = None  # score the prompt too: each token's logprob and this many alternatives
    id: int = 0
    # filled in by the engine
    arrival: float = 0.0
    t_scheduled: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the backend's prefix cache
    text: str = ""
    sent: int = 0
    cancelled: bool = False
    finished: bool = False
    sampler: Sampler | None = None
    detok: TextStream | None = None


class Engine:
    """Owns the backend and the scheduling thread. `submit` and `abort` are safe from any thread."""

    def __init__(self, backend, tokenizer, max_batch: int = 32, max_queue: int = 64, metrics=None,
                 eos_ids: list[int] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.eos_ids = set(eos_ids if eos_ids is not None else _eos_ids(tokenizer, backend))
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._running: list[GenRequest] = []
        # long prompts being prefilled a part per step (backend.prefill_part), between the running batch's steps
        self._chunking: collections.deque[GenRequest] = collections.deque()
        self.prefill_chunk = int(getattr(backend, "prefill_chunk", 0) or 0)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_batch_seen = 0

    # ---------------------------------------------------------------------------------------------
    # public, any thread

    def start(self) -> None:
        self.backend.reset()
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> GenRequest:
        with self._cv:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            # Capacity is the batch plus the waiting line; past it the client should retry later.
            if len(self._waiting) + self.num_running >= self.max_batch + self.max_queue:
                raise QueueFull(f"the server is full ({self.max_batch} running, {self.max_queue} waiting)")
            req.id = next(self._ids)
            req.arrival = time.perf_counter()
            self._waiting.append(req)
            self._cv.notify()
        return req

    def abort(self, req: GenRequest) -> None:
        """Mark a request abandoned; the engine drops it at its next step."""
        req.cancelled = True
        with self._cv:
            waiting = req in self._waiting
            if waiting:  # never scheduled: leave the line now, so it stops counting against the capacity
                self._waiting.remove(req)
            self._cv.notify_all()
        if waiting:
            self._finish(req, "abort")

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new work; with drain, let running and waiting requests finish first."""
        with self._cv:
            self._accepting = False
            if not drain:
                for r in list(self._waiting) + self._running + list(self._chunking):
                    r.cancelled = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (True), or until timeout seconds pass (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._running and not self._chunking and not self._waiting, timeout)

    @property
    def num_running(self) -> int:
        """Sequences holding a batch slot: decoding, or prefilling a long prompt part by part."""
        return len(self._running) + len(self._chunking)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---------------------------------------------------------------------------------------------
    # engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running and not self._chunking and not self._stop:
                    self._cv.wait()
                if self._stop and not self._waiting and not self._running and not self._chunking:
                    return
                admit = []
                while self._waiting and self.num_running + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
            for group in self._prefill_groups(admit):
                self._prefill(group)
            if self._chunking:
                self._prefill_next_part()
            self._reap()
            if self._running:
                self._decode()
                self._reap()

    def _reap(self) -> None:
        keep = []
        for r in self._running:
            if r.cancelled and not r.finished:
                self._finish(r, "abort")
            if r.finished:
                self.backend.release(r.id)
            else:
                keep.append(r)
        with self._cv:
            self._running = keep
            self._cv.notify_all()

    def _prefill_groups(self, admit: list[GenRequest]) -> list[list[GenRequest]]:
        """Split requests admitted together into prefill batches of at most PREFILL_TOKENS padded tokens."""
        if not hasattr(self.backend, "prefill_many"):
            return [[r] for r in admit]
        groups: list[list[GenRequest]] = []
        for req in admit:
            group = groups[-1] if groups else None
            if _alone(req) or (group and _alone(group[0])):
                groups.append([req])
            elif group and (len(group) + 1) * max(len(req.prompt_ids), *(len(r.prompt_ids) for r in group)) \
                    <= PREFILL_TOKENS:
                group.append(req)
            else:
                groups.append([req])
        return groups

    def _prefill(self, group: list[GenRequest]) -> None:
        live = []
        for req in group:
            if req.cancelled:
                self._finish(req, "abort")
            else:
                live.append(req)
        if not live:
            return
        start = time.perf_counter()
        try:
            for req in live:
                req.t_scheduled = start
                req.sampler = Sampler(req.params, req.prompt_ids, self.backend.vocab_size)
            if (len(live) == 1 and not _alone(live[0]) and self.prefill_chunk
                    and len(live[0].prompt_ids) > self.prefill_chunk and (self._running or self._chunking)):
                self._chunking.append(live[0])  # prefilled a part per step, the running batch decoding between
                return
            if len(live) == 1 and _alone(live[0]):
                last = self._prefill_alone(live[0])
                if last is None:  # nothing to generate
                    return
                rows = last.unsqueeze(0)
            elif len(live) == 1:
                rows = self.backend.prefill(live[0].id, live[0].prompt_ids).unsqueeze(0)
            else:
                rows = self.backend.prefill_many([(r.id, r.prompt_ids) for r in live])  # (B, V)
            for row, req in enumerate(live):
                self._note_cached(req)
                self._accept(req, req.sampler(rows[row]))
        except Exception as exc:  # one bad request must not take the engine down
            log.exception("prefill failed")
            for req in live:
                self.backend.release(req.id)
                self._fail(req, exc)
            return
        with self._cv:
            self._running.extend(live)

    def _note_cached(self, req: GenRequest) -> None:
        """After a prefill: how many prompt tokens the backend's prefix cache gave (backends without one: 0)."""
        cached = getattr(self.backend, "cached_prompt_tokens", None)
        if cached is not None:
            req.cached_tokens = cached(req.id)

    def _prefill_next_part(self) -> None:
        """One part of the first long prompt in line (all of what is left when nothing else runs); when its last
        part is in, sample its first token and let it join the batch."""
        req = self._chunking[0]
        if req.cancelled:
            self._chunking.popleft()
            self.backend.release(req.id)
            self._finish(req, "abort")
            return
        budget = self.prefill_chunk if self._running else len(req.prompt_ids)
        try:
            last = self.backend.prefill_part(req.id, req.prompt_ids, budget)
            if last is None:
                return
            self._chunking.popleft()
            self._note_cached(req)
            self._accept(req, req.sampler(last))
        except Exception as exc:  # one bad request must not take the engine down
            log.exception("prefill failed")
            if self._chunking and self._chunking[0] is req:
                self._chunking.popleft()
            self.backend.release(req.id)
            self._fail(req, exc)
            return
        with self._cv:
            self._running.append(req)

    def _prefill_alone(self, req: GenRequest):
        """Prefill a request that scores its prompt or generates nothing: its (V,) next-token logits, or None when
        it is done already (max_tokens 0)."""
        last = None
        if req.prompt_logprobs is not None:
            last, entries = self.backend.prefill_scored(req.id, req.prompt_ids, req.prompt_logprobs)
            req.sink({"type": "prompt", "logprobs": [{"id": req.prompt_ids[0], "logprob": None, "top": None},
                                                     *entries]})
        elif req.max_tokens > 0:
            last = self.backend.prefill(req.id, req.prompt_ids)
        if req.max_tokens > 0:
            return last
        self.backend.release(req.id)
        self._finish(req, "length")
        return None

    def _decode(self) -> None:
        batch = list(self._running)
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        try:
            logits = self.backend.decode([r.id for r in batch], [r.output_ids[-1] for r in batch])  # (B, V)
            self.steps += 1
            for row, req in enumerate(batch):
                if not req.cancelled:
                    self._accept(req, req.sampler(logits[row]))
        except Exception as exc:
            log.exception("decode step failed")
            for req in batch:
                if not req.finished:
                    self._fail(req, exc)
            self.backend.reset()

    def _accept(self, req: GenRequest, choice) -> None:
        """Record a sampled token; emit the text that is final so far; finish on EOS, stop string or length."""
        token, logprob, top = choice
        now = time.perf_counter()
        first = not req.output_ids
        if first:
            req.t_first = now
            if self.metrics:
                self.metrics.first_token(now - req.arrival, req.t_scheduled - req.arrival)
        elif self.metrics:
            self.metrics.inter_token(now - req.t_last)
        req.t_last = now
        req.output_ids.append(token)
        entry = None
        if logprob is not None:
            entry = {"id": token, "logprob": logprob, "top": top}
        if token in self.eos_ids:
            if req.detok is not None:
                req.text = req.detok.final(req.output_ids[:-1])
            self._emit(req, req.text[req.sent:], [token], entry)
            self._finish(req, "stop")
            return
        if req.detok is None:
            req.detok = TextStream(self.tokenizer)
        text = req.detok.add(token, req.output_ids)
        # Search from what was sent: held-back text can change (bytes of one character decode to U+FFFD until the
        # character is complete), so a stop string can begin before len(req.text).
        stop_at = _find_stop(text, req.stop, req.sent)
        if stop_at is not None:
            req.text = text[:stop_at]
            self._emit(req, req.text[req.sent:], [token], entry)
            self._finish(req, "stop")
            return
        req.text = text
        if len(req.output_ids) >= req.max_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.backend.max_len:
            text = req.text = req.detok.final(req.output_ids)  # with an unfinished character's U+FFFD, as decoded whole
            self._emit(req, text[req.sent:], [token], entry)
            self._finish(req, "length")
            return
        safe = _safe_end(text, req.stop)
        self._emit(req, text[req.sent:safe], [token], entry)

    def _emit(self, req: GenRequest, text: str, token_ids: list[int], entry) -> None:
        req.sent += len(text)
        if text or entry is not None or token_ids:
            req.sink({"type": "delta", "text": text, "token_ids": token_ids, "logprobs": [entry] if entry else []})

    def _finish(self, req: GenRequest, reason: str) -> None:
        if req.finished:
            return
        req.finished = True
        now = time.perf_counter()
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                 "total_tokens": len(req.prompt_ids) + len(req.output_ids)}
        if req.cached_tokens:  # OpenAI's field for prompt tokens served from a cache
            usage["prompt_tokens_details"] = {"cached_tokens": req.cached_tokens}
        timings = self.timings(req, now)
        if self.metrics:
            self.metrics.finished(req, reason, now - req.arrival)
        req.sink({"type": "done", "finish_reason": reason, "usage": usage, "timings": timings})

    def _fail(self, req: GenRequest, exc: BaseException) -> None:
        if req.finished:
            return
        req.finished = True
        if self.metrics:
            self.metrics.finished(req, "error", time.perf_counter() - req.arrival)
        req.sink({"type": "error", "message": f"generation failed: {type(exc).__name__}: {exc}"})

    @staticmethod
    def timings(req: GenRequest, now: float) -> dict:
        n = len(req.output_ids)
        started = req.t_scheduled or now
        first = req.t_first or now
        e2e = now - req.arrival
        out = {
            "queue_ms": round(1000 * (started - req.arrival), 3),
            "prefill_ms": round(1000 * (first - started), 3),
            "ttft_ms": round(1000 * (first - req.arrival), 3),
            "decode_ms_per_token": round(1000 * (req.t_last - first) / (n - 1), 3) if n > 1 else None,
            "tokens_per_second": round(n / e2e, 3) if e2e > 0 else None,
            "e2e_ms": round(1000 * e2e, 3),
            "prompt_tokens": len(req.prompt_ids),
            "cached_prompt_tokens": req.cached_tokens,
            "completion_tokens": n,
            "peak_memory_mb": round(peak_rss_bytes() / 2**20, 1),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["accelerator_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


class TextStream:
    """A request's text as its tokens come, decoded incrementally (tokenizers' `DecodeStream`: a few tokens of
    context a step, where decoding the whole output again cost ~95 us a token at 128 tokens and grew with the answer,
    on the engine thread every request shares). The text is what decoding the whole output gives, except that the
    token with an unfinished character's bytes waits for the rest (decoded whole, they are U+FFFD, which the engine
    holds back anyway; text before them in that token, a space say, now waits too); `final` decodes the whole output
    once, at the end. Tokenizers without a fast backend, or whose decode
    cleans up spaces across tokens (not a per-token operation), are decoded whole each time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            try:
                from tokenizers.decoders import DecodeStream

                self.stream, self.backend = DecodeStream(skip_special_tokens=True), backend
            except ImportError:  # tokenizers before 0.21
                pass

    def add(self, token: int, ids: list[int]) -> str:
        """The text after `token` (the last of `ids`, the whole output so far)."""
        if self.stream is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        try:
            piece = self.stream.step(self.backend, token)
        except Exception:  # an id outside the vocabulary (a model whose head is wider): decode as a whole
            self.stream = None
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        if piece:
            self.text += piece
        return self.text

    def final(self, ids: list[int]) -> str:
        """The whole output decoded once: what `add` gave plus an unfinished character's U+FFFD, if any (what was
        streamed stays a prefix of it: were a tokenizer to decode differently whole, the streamed text is kept)."""
        whole = self.tokenizer.decode(ids, skip_special_tokens=True)
        return whole if self.stream is None or whole.startswith(self.text) else self.text


def _alone(req: GenRequest) -> bool:
    """Whether a request is prefilled on its own: scoring the prompt needs every position's logits."""
    return req.prompt_logprobs is not None or req.max_tokens == 0


def _eos_ids(tokenizer, backend) -> list[int]:
    ids = set(getattr(backend, "eos_token_ids", None) or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    model = getattr(backend, "model", None)
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return sorted(ids)


def _find_stop(text: str, stops: list[str], checked: int) -> int | None:
    """Index of the earliest stop string in text, or None; `checked` characters of text are final and were already
    searched, so only matches ending past them are looked for."""
    best = None
    for s in stops:
        start = max(0, checked - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of text can be sent: hold back a tail that may begin a stop string or an unfinished character."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        # The longest tail of text[:end] shorter than s that begins s: try the places s's first character occurs,
        # leftmost first (slicing s[:k] for every k was quadratic in the text, per token: 46 ms a token for a
        # 40,000-character stop string after 32,000 characters of text, on the engine thread every request shares).
        i = max(0, end - len(s) + 1)
        while (i := text.find(s[0], i, end)) != -1:
            if s.startswith(text[i:end]):
                hold = max(hold, end - i)
                break
            i += 1
    return end - hold
