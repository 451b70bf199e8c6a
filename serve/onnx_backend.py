"""The ONNX Runtime backend of the engine (`slimlm.serve.backends` has the protocol, the PyTorch backend and the
loading): one batched decode of all running sequences per step over an `export.OnnxCausalLM`, with the batch's
cache in place where the graph allows it, and the prompt prefix cache (`slimlm.serve.prefix`)."""

from __future__ import annotations

import numpy as np
import torch

from slimlm.serve import backends
from slimlm.serve.backends import _padding_mask, _slots, _stacked
from slimlm.serve.sampling import score_tokens

# positions an in-place batch cache is allocated beyond what it needs (rounded up to a multiple of this)
IN_PLACE_HEADROOM = 256


class OnnxBackend:
    """ONNX Runtime through `slimlm.export.OnnxCausalLM`, decoding all running sequences as one batch.

    As in `TorchBackend`: each prefilled sequence keeps its own (1, kvh, n, d) cache until it joins; the
    running batch holds one padded (B, kvh, L, d) cache per attention layer, a (B, L) mask that hides
    the padding and per-row positions; it is rebuilt only when the set of sequences changes.

    Graphs that take right padding (`OnnxCausalLM.right_padding`: the fused-attention export) keep each row's
    slots first and write its new token right after them, so a row's arithmetic, and its greedy tokens, are the
    same alone or in any batch. Other graphs are left-padded: the padding beside a row changes the order of the
    attention sums, last-bit differences that int8/int4 activation rounding can grow into a different token.

    prefix_cache_mb: memory for the key/value arrays of recent prompts (`slimlm.serve.prefix`): a prompt that
    begins like one of them prefills only the rest. Used only where the graph computes a prompt split in two
    exactly as whole (checked here, once: `prefix.splits_exactly`), so a request's tokens never depend on what
    others left in the cache; 0 turns it off.
    prefill_chunk: a long prompt may be prefilled in parts of this many tokens (`prefill_part`), so that the engine
    can run the batch's decode steps between them; the same check makes it exact. 0: whole prompts only.
    """

    name = "onnx"

    def __init__(self, lm, max_len: int | None = None, path: str = "", prefix_cache_mb: int = 0,
                 prefill_chunk: int = 0):
        self.lm = lm
        self.path = path
        config = lm.config
        model_max = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        # a fused-attention graph holds a rotary table of `max_positions` rows: positions stop there
        model_max = min(model_max, int((getattr(lm, "info", None) or {}).get("max_positions") or model_max))
        self.max_len = int(max_len or model_max)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_ids = sorted(getattr(lm, "eos_token_ids", None) or ())
        self.right = bool(getattr(lm, "right_padding", False))
        # right-padded fused graphs on the CPU decode with the batch's cache in place (export.runtime.InPlaceCache)
        shares = getattr(lm, "shares_buffer", None)
        self.in_place = self.right and shares is not None and shares(self.max_len)
        from slimlm.serve.prefix import PrefixCache, splits_exactly

        # a prompt prefilled in parts equals it prefilled whole, bit for bit (checked only where something uses it)
        self.exact_splits = bool((prefix_cache_mb > 0 or prefill_chunk > 0) and splits_exactly(lm))
        inexact = ("off (on this CPU a prompt prefilled in two parts differs in the last bits from it prefilled "
                   "whole: answers would depend on {})")
        self.prefix, self.prefix_reason = None, "off (--prefix-cache-mb 0)"
        if prefix_cache_mb > 0 and self.exact_splits:
            self.prefix = PrefixCache(prefix_cache_mb * 2**20)
            self.prefix_reason = (f"{prefix_cache_mb} MB (a prompt prefilled in two parts equals it prefilled "
                                  "whole, bit for bit, on this CPU)")
        elif prefix_cache_mb > 0:
            self.prefix_reason = inexact.format("the cache")
        self.prefill_chunk, self.chunk_reason = 0, "off (--prefill-chunk 0)"
        if prefill_chunk > 0 and self.exact_splits:
            self.prefill_chunk = int(prefill_chunk)
            self.chunk_reason = (f"{prefill_chunk} tokens a part, decode steps between parts (exact on this CPU, as "
                                 "above)")
        elif prefill_chunk > 0:
            self.chunk_reason = inexact.format("the load")
        self.reset()

    def reset(self) -> None:
        self.pending: dict[int, list] = {}  # seq_id -> per-layer (K, V) numpy (1, kvh, n, d), before joining
        self.lengths: dict[int, int] = {}  # seq_id -> positions in its cache (a prompt in parts: so far)
        self.cached: dict[int, int] = {}  # seq_id -> prompt tokens its prefill took from the prefix cache
        self.order: list[int] = []
        self.past = None  # per-layer (K, V) numpy (B, kvh, L, d) over `order`, left-padded
        self.mask = None  # numpy (B, L) int64
        self.cache = None  # the InPlaceCache over `order` whose buffers `past` then is

    def prefill(self, seq_id: int, ids: list[int]) -> torch.Tensor:
        return self.prefill_part(seq_id, ids, len(ids))

    def prefill_part(self, seq_id: int, ids: list[int], budget: int) -> torch.Tensor | None:
        """Prefill the next part of a prompt, at most `budget` tokens (a part never leaves fewer than MIN_NEW tokens
        behind: see `serve.prefix`); the (V,) logits of its last token once the whole prompt is in, else None. The
        first part begins after what the prefix cache holds."""
        from slimlm.serve.prefix import MIN_NEW

        n = len(ids)
        if seq_id not in self.lengths:
            c, past = self.prefix.lookup(ids) if self.prefix is not None else (0, None)
            self.cached[seq_id], self.pending[seq_id], self.lengths[seq_id] = c, past, c
        done = self.lengths[seq_id]
        end = n if n - done - max(budget, MIN_NEW) < MIN_NEW else done + max(budget, MIN_NEW)
        logits, present = self.lm.step(np.array([ids[done:end]], dtype=np.int64), np.ones((1, end), dtype=np.int64),
                                       np.arange(done, end, dtype=np.int64)[None], self.pending[seq_id], last=1)
        self.pending[seq_id], self.lengths[seq_id] = present, end
        if end < n:
            return None
        if self.prefix is not None:
            self.prefix.store(ids, present)
        return logits[0, -1].float()

    def cached_prompt_tokens(self, seq_id: int) -> int:
        """How many of the sequence's prompt tokens came from the prefix cache (read once, after its prefill)."""
        return self.cached.pop(seq_id, 0)

    def prefill_scored(self, seq_id: int, ids: list[int], top: int) -> tuple[torch.Tensor, list[dict]]:
        n = len(ids)
        logits, present = self.lm.step(torch.tensor([ids], dtype=torch.long), torch.ones(1, n, dtype=torch.long),
                                       torch.arange(n, dtype=torch.long).view(1, n), None)  # (1, T, V)
        self.pending[seq_id] = present
        self.lengths[seq_id] = n
        entries = []
        for s in range(0, n - 1, backends.SCORE_ROWS):
            entries += score_tokens(logits[0, s:min(s + backends.SCORE_ROWS, n - 1)],
                                    ids[s + 1:s + 1 + backends.SCORE_ROWS], top)
        return logits[0, -1].float(), entries

    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        if self.in_place:
            return self._decode_in_place(seq_ids, tokens)
        if seq_ids != self.order:
            self._rebuild(seq_ids)
        b = len(seq_ids)
        positions = np.array([[self.lengths[s]] for s in seq_ids], dtype=np.int64)
        if self.right:  # each row's new token goes right after its own slots
            mask = _padding_mask([self.lengths[s] + 1 for s in seq_ids], self.mask.shape[1] + 1, right=True)
        else:
            mask = np.concatenate([self.mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        logits, present = self.lm.step(np.array(tokens, dtype=np.int64).reshape(b, 1), mask, positions, self.past)
        self.past, self.mask = present, mask
        for s in seq_ids:
            self.lengths[s] += 1
        return logits[:, -1].float()  # (B, V)

    def _decode_in_place(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        """A step over the in-place cache, whose rows follow `self.order` (not the caller's order: a sequence keeps
        its row while others come and go)."""
        if self.cache is None or len(seq_ids) != len(self.order) or set(seq_ids) != set(self.order):
            self._reslot(seq_ids)
        row = {s: i for i, s in enumerate(self.order)}
        token_of = dict(zip(seq_ids, tokens))
        lengths = [self.lengths[s] for s in self.order]
        need = max(lengths) + 1
        if need > self.cache.capacity:  # room for more positions: a larger buffer, the slots copied over
            self._in_place(self.cache.arrays, need, self.cache.rows)
        mask = _padding_mask([n + 1 for n in lengths], self.cache.capacity, right=True)
        ids = np.array([token_of[s] for s in self.order], dtype=np.int64).reshape(-1, 1)
        logits = self.cache.run(ids, mask, np.array(lengths, dtype=np.int64).reshape(-1, 1))
        for s in self.order:
            self.lengths[s] += 1
        out = logits[:, -1].float()
        order = [row[s] for s in seq_ids]
        return out if order == list(range(len(order))) else out[order]  # (B, V) in the caller's order

    def _reslot(self, seq_ids: list[int]) -> None:
        """Fit the in-place cache to a new set of sequences: a finished sequence's row is filled by the last row,
        a new sequence's prefill cache is copied into the next free row; the buffers are reallocated only when
        rows or positions run out (no copy of the whole batch's cache at every join or leave)."""
        live = set(seq_ids)
        order = list(self.order) if self.cache is not None else []
        i = 0
        while i < len(order):
            if order[i] in live:
                i += 1
                continue
            while len(order) > i + 1 and order[-1] not in live:
                order.pop()
            if len(order) > i + 1:
                self.cache.move_row(len(order) - 1, i, self.lengths[order[-1]])
                order[i] = order.pop()
                i += 1
            else:
                order.pop()
        placed = set(order)
        new = [s for s in seq_ids if s not in placed]
        need = max(self.lengths[s] for s in seq_ids) + 1
        rows = len(order) + len(new)
        if self.cache is None or rows > self.cache.rows or need > self.cache.capacity:
            cur = self.cache.rows if self.cache is not None else 0
            if order:
                self.cache.set_batch(len(order))
                past = self.cache.arrays
            else:
                past = [(np.zeros((0, self.lm.kv_heads, 0, self.lm.head_dim), self.lm.kv_dtype),) * 2
                        for _ in range(self.lm.n_kv)]
            self._in_place(past, need, cur if rows <= cur else max(rows, 2 * cur))
        for s in new:
            self.cache.put_row(len(order), self.pending.pop(s), self.lengths[s])
            order.append(s)
        self.cache.set_batch(len(order))
        self.order = order

    def _rebuild(self, seq_ids: list[int]) -> None:
        old_rows = {s: i for i, s in enumerate(self.order)}
        lengths = [self.lengths[s] for s in seq_ids]
        past = []
        for li in range(self.lm.n_kv):
            parts = []
            for s, n in zip(seq_ids, lengths):
                if s in old_rows:
                    k, v = self.past[li]
                    r, at = old_rows[s], _slots(k.shape[2], n, self.right)
                    parts.append((k[r, :, at], v[r, :, at]))
                else:
                    k, v = self.pending[s][li]
                    parts.append((k[0], v[0]))
            past.append(_stacked(parts, lengths, self.right))
        mask = _padding_mask(lengths, right=self.right)
        for s in seq_ids:
            self.pending.pop(s, None)
        self.past, self.mask, self.order = past, mask, list(seq_ids)

    def _in_place(self, past, need: int, rows: int) -> None:
        """Put the batch's cache in buffers of `rows` rows with room for `need` positions and some more (up to
        max_len)."""
        from slimlm.export.runtime import InPlaceCache

        capacity = min(self.max_len, -(-(need + IN_PLACE_HEADROOM) // IN_PLACE_HEADROOM) * IN_PLACE_HEADROOM)
        self.cache = InPlaceCache(self.lm, past, max(capacity, need), rows=rows)

    def release(self, seq_id: int) -> None:
        self.pending.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        self.cached.pop(seq_id, None)
        if not self.lengths:
            self.order, self.past, self.mask, self.cache = [], None, None, None

    def info(self) -> dict:
        import os

        size = 0
        if self.path and os.path.isdir(self.path):
            for root, _, files in os.walk(self.path):
                size += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith((".onnx", ".data")))
        out = {"backend": self.name, "path": self.path, "size_bytes": size,
               "layers": getattr(self.lm.config, "num_hidden_layers", None)}
        if self.prefix is not None:
            out["prefix_cache"] = self.prefix.stats()
        return out

    def size_bytes(self) -> int:
        return int(self.info()["size_bytes"])
