"""Prompt prefix caching for the ONNX backend: the key/value cache of recent prompts, so that a new prompt which
begins like one of them (a chat's system prompt, a conversation's earlier turns, a few-shot preamble) prefills only
the tokens after the shared part.

A prompt prefilled in two parts (its first c tokens, then the rest over their cache) must come out exactly as the
whole prompt in one forward, or a request's answer would depend on what other requests happened to leave in the
cache. `splits_exactly` checks this on the running graph at start-up (onnxruntime's CPU kernels compute each row of
a prompt the same way whatever the rows beside it, on the CPUs measured: int8, int4 and fp32 exports, prompts of
39-1,500 tokens, every split, bit for bit), and the cache is used only where it holds. One exception is built in:
a single token over a past runs GroupQueryAttention's decode path, whose sums differ in the last bits from the
prompt path, so a reused prefix always leaves at least `MIN_NEW` tokens to compute.
"""

from __future__ import annotations

import collections
import logging

import numpy as np

log = logging.getLogger("slimlm.serve")

MIN_NEW = 2  # tokens a prefill computes after a reused prefix (see the module docstring)
MIN_REUSE = 4  # shorter shared prefixes are not worth a lookup's copy


class PrefixCache:
    """Recent prompts' per-layer key/value arrays, least recently used evicted past `max_bytes`.

    Entries are whole prompts: (token ids, [(K, V) numpy (1, kv_heads, n, head_dim)] per layer). `lookup` finds
    the entry sharing the longest prefix with a prompt and returns that many positions of its cache (at most
    len(prompt) - MIN_NEW). An entry whose prompt begins a newer one is dropped when the newer one is stored: the
    newer one serves every prompt the older one could.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: collections.OrderedDict[int, tuple[np.ndarray, list]] = collections.OrderedDict()
        self.bytes = 0
        self._ids = 0
        self.hits = self.lookups = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _nbytes(past) -> int:
        return sum(k.nbytes + v.nbytes for k, v in past)

    @staticmethod
    def _common(a: np.ndarray, b: np.ndarray) -> int:
        n = min(len(a), len(b))
        diff = np.flatnonzero(a[:n] != b[:n])
        return int(diff[0]) if diff.size else n

    def lookup(self, ids) -> tuple[int, list | None]:
        """(c, past): the first c positions of a cached prompt's key/value arrays (read-only, contiguous) that equal
        `ids`' first c tokens, c <= len(ids) - MIN_NEW; (0, None) when no entry shares MIN_REUSE tokens."""
        self.lookups += 1
        ids = np.asarray(ids, dtype=np.int64)
        best, best_key = 0, None
        for key, (tokens, _) in self.entries.items():
            c = self._common(tokens, ids)
            if c > best:
                best, best_key = c, key
        best = min(best, len(ids) - MIN_NEW)
        if best_key is None or best < MIN_REUSE:
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(_read_only(k[:, :, :best]), _read_only(v[:, :, :best])) for k, v in self.entries[best_key][1]]

    def store(self, ids, past) -> None:
        """Keep a prompt's key/value arrays (not copied: the caller must not write into them)."""
        size = self._nbytes(past)
        if size > self.max_bytes:
            return
        ids = np.asarray(ids, dtype=np.int64)
        for key, (tokens, old) in list(self.entries.items()):
            if len(tokens) <= len(ids) and self._common(tokens, ids) == len(tokens):
                del self.entries[key]
                self.bytes -= self._nbytes(old)
        self._ids += 1
        self.entries[self._ids] = (ids, past)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self.entries.popitem(last=False)
            self.bytes -= self._nbytes(old)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens}


def _read_only(a: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(a)  # the stored array itself where the slice is whole: never written through
    if out is a:
        out = a.view()
    out.flags.writeable = False
    return out


def splits_exactly(lm, length: int = 24, at: int = 10, seed: int = 0) -> bool:
    """Whether `lm` (an OnnxCausalLM) computes a prompt prefilled as its first `at` tokens then the rest exactly as
    the whole prompt at once: the last position's logits and every layer's key/value arrays, bit for bit."""
    rng = np.random.default_rng(seed)
    vocab = int(lm.config.vocab_size)
    ids = rng.integers(min(3, vocab - 1), vocab, size=(1, length), dtype=np.int64)
    ones = np.ones((1, length), np.int64)
    whole, whole_past = lm.step(ids, ones, np.arange(length)[None], None)
    head, past = lm.step(ids[:, :at], ones[:, :at], np.arange(at)[None], None)
    tail, tail_past = lm.step(ids[:, at:], ones, np.arange(at, length)[None], past)
    if not np.array_equal(whole[0, -1].numpy(), tail[0, -1].numpy()):
        return False
    return all(np.array_equal(a, b) for pa, pb in zip(whole_past, tail_past) for a, b in zip(pa, pb))
