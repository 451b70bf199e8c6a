"""Model backends for the engine: one small protocol, a PyTorch backend and an ONNX Runtime backend.

The engine only needs three calls, all made from its own thread:
  prefill(seq_id, ids) -> (V,) logits of the last prompt token, caching that sequence's keys/values
  (optionally prefill_many([(seq_id, ids), ...]) -> (B, V) for several prompts in one forward);
  prefill_scored(seq_id, ids, top) -> the same (V,) logits and the logprob of every prompt token after the first
  with its `top` alternatives (`sampling.score_tokens`), for echo with logprobs;
  decode(seq_ids, tokens) -> (B, V) logits, one new token for each of those sequences;
  release(seq_id) forgets a sequence.

`TorchBackend` decodes all running sequences as one batch (so does `OnnxBackend`, in `slimlm.serve.onnx_backend`).
Their per-layer caches are left-padded to a common length and stacked into one `DynamicCache`; a per-row
attention mask hides the padding and per-row position ids keep every sequence at its own positions, so a row
computes what it would alone. The batched cache is rebuilt only when the set of sequences changes. Requests admitted
together are prefilled in one left-padded forward the same way.

An FFN replacement slot (`slimlm.models.FFNLayer`) never writes the cache: its layer stays empty
and is carried as `None`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from slimlm.errors import SlimlmError, require
from slimlm.export.runtime import is_onnx_dir  # noqa: F401 (serve.cli asks it here)
from slimlm.models import with_cache
from slimlm.serve.sampling import score_tokens

log = logging.getLogger("slimlm.serve")

# Prompt positions whose full-vocabulary logits exist at once when a prompt is scored (512 x 49k vocab = 100 MB).
SCORE_ROWS = 512


class Backend(Protocol):
    name: str
    max_len: int
    vocab_size: int

    def prefill(self, seq_id: int, ids: list[int]) -> torch.Tensor: ...

    def prefill_scored(self, seq_id: int, ids: list[int], top: int) -> tuple[torch.Tensor, list[dict]]: ...

    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor: ...

    def release(self, seq_id: int) -> None: ...

    def reset(self) -> None: ...

    def info(self) -> dict: ...


def _layer_kv(cache, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-layer (keys, values) of a DynamicCache; None where a layer never wrote (FFN slots)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    layers = list(cache.layers)
    for i in range(n_layers):
        layer = layers[i] if i < len(layers) else None
        empty = layer is None or not getattr(layer, "is_initialized", False) or layer.keys is None
        if empty or layer.keys.numel() == 0:
            out.append(None)
        else:
            out.append((layer.keys, layer.values))
    return out


def _stacked(parts: list, lengths: list[int], right: bool = False) -> tuple:
    """Stack per-sequence (K, V) of shape (kvh, n_r, d) into (B, kvh, max n, d), zeros elsewhere: each row's n_r slots
    last (left padding, the default) or first (right padding). Works on torch tensors and numpy arrays alike."""
    width = max(lengths)
    k0 = parts[0][0]
    shape = (len(parts), k0.shape[0], width, k0.shape[-1])
    keys = k0.new_zeros(shape) if isinstance(k0, torch.Tensor) else np.zeros(shape, dtype=k0.dtype)
    values = keys.clone() if isinstance(keys, torch.Tensor) else keys.copy()
    for r, ((k, v), n) in enumerate(zip(parts, lengths)):
        at = _slots(width, n, right)
        keys[r, :, at] = k
        values[r, :, at] = v
    return keys, values


def _slots(width: int, n: int, right: bool) -> slice:
    """Where a row's n valid slots lie among `width`: first (right padding) or last (left padding)."""
    return slice(0, n) if right else slice(width - n, width)


def _padding_mask(lengths: list[int], width: int | None = None, right: bool = False):
    """(B, width) int64 numpy mask (width: the longest row by default), 1 on each row's `length` valid positions:
    the last ones (left padding) or the first ones (right padding)."""
    width = width or max(lengths)
    slots, n = np.arange(width)[None, :], np.array(lengths)[:, None]
    return (slots < n if right else slots >= width - n).astype(np.int64)


def _model_size_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class TorchBackend:
    """Batched decode over a Hugging Face causal LM with per-sequence caches (see the module docstring)."""

    name = "torch"

    def __init__(self, model, tokenizer, max_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.n_layers = int(model.config.num_hidden_layers)
        model_max = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        self.max_len = int(max_len or model_max)
        self.vocab_size = int(model.config.vocab_size)
        self.reset()

    def reset(self) -> None:
        self.pending: dict[int, list] = {}  # seq_id -> per-layer (K, V) of shape (1, kvh, n, d), before joining
        self.lengths: dict[int, int] = {}  # seq_id -> tokens in its cache
        self.order: list[int] = []  # rows of the batched cache
        self.cache = None  # DynamicCache over `order`, left-padded
        self.mask: torch.Tensor | None = None  # (B, L) 1 where a row has a real token

    @torch.inference_mode()
    def prefill(self, seq_id: int, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **with_cache(self.model, cache))
        self.pending[seq_id] = _layer_kv(cache, self.n_layers)  # the cache object is filled in place
        self.lengths[seq_id] = len(ids)
        return out.logits[0, -1].float()  # (V,)

    @torch.inference_mode()
    def prefill_scored(self, seq_id: int, ids: list[int], top: int) -> tuple[torch.Tensor, list[dict]]:
        """`prefill`, and the logprob of each prompt token given the ones before it. The full-vocabulary logits of a
        long prompt are never held at once: the decoder's last hidden states go through the output head
        SCORE_ROWS positions at a time."""
        from transformers import DynamicCache

        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        cache = DynamicCache()
        hidden = decoder(input_ids=input_ids, use_cache=True, **with_cache(decoder, cache)).last_hidden_state[0]
        self.pending[seq_id] = _layer_kv(cache, self.n_layers)
        self.lengths[seq_id] = len(ids)
        entries: list[dict] = []
        for s in range(0, len(ids) - 1, SCORE_ROWS):
            logits = head(hidden[s:s + SCORE_ROWS]).float()  # (rows, V)
            entries += score_tokens(logits[: len(ids) - 1 - s], ids[s + 1:s + 1 + SCORE_ROWS], top)
        return head(hidden[-1:]).float()[0], entries  # (V,)

    @torch.inference_mode()
    def prefill_many(self, items: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Prefill several prompts in one forward, left-padded (mask and per-row positions hide the padding);
        each sequence keeps only its own positions of the cache. Returns (B, V) last-token logits."""
        from transformers import DynamicCache

        if len(items) == 1:
            return self.prefill(*items[0]).unsqueeze(0)
        lengths = [len(ids) for _, ids in items]
        b, width = len(items), max(lengths)
        input_ids = torch.zeros(b, width, dtype=torch.long, device=self.device)  # (B, L)
        mask = torch.zeros(b, width, dtype=torch.long, device=self.device)
        for r, ((_, ids), n) in enumerate(zip(items, lengths)):
            input_ids[r, width - n:] = torch.tensor(ids, dtype=torch.long, device=self.device)
            mask[r, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **with_cache(self.model, cache))
        kv = _layer_kv(cache, self.n_layers)
        for r, ((seq_id, _), n) in enumerate(zip(items, lengths)):
            self.pending[seq_id] = [None if x is None else (x[0][r:r + 1, :, width - n:], x[1][r:r + 1, :, width - n:])
                                    for x in kv]
            self.lengths[seq_id] = n
        return out.logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], tokens: list[int]) -> torch.Tensor:
        if seq_ids != self.order:
            self._rebuild(seq_ids)
        b = len(seq_ids)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(b, 1)  # (B, 1)
        positions = torch.tensor([self.lengths[s] for s in seq_ids], dtype=torch.long, device=self.device).view(b, 1)
        mask = torch.cat([self.mask, torch.ones(b, 1, dtype=self.mask.dtype, device=self.device)], dim=1)  # (B, L+1)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **with_cache(self.model, self.cache))  # self.cache grows in place
        self.mask = mask
        for s in seq_ids:
            self.lengths[s] += 1
        return out.logits[:, -1].float()  # (B, V)

    def release(self, seq_id: int) -> None:
        self.pending.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        # The batched cache keeps the row until the next rebuild; decode() never runs with a stale set.
        if not self.lengths:
            self.order, self.cache, self.mask = [], None, None

    def _rebuild(self, seq_ids: list[int]) -> None:
        """Stack the caches of `seq_ids` (rows of the current batch or freshly prefilled) left-padded."""
        from transformers import DynamicCache

        old_rows = {s: i for i, s in enumerate(self.order)}
        old = _layer_kv(self.cache, self.n_layers) if self.cache is not None else [None] * self.n_layers
        lengths = [self.lengths[s] for s in seq_ids]
        layers = []
        for li in range(self.n_layers):
            parts = []
            for s, n in zip(seq_ids, lengths):
                if s in old_rows:
                    kv = old[li]
                    parts.append(None if kv is None else (kv[0][old_rows[s], :, -n:], kv[1][old_rows[s], :, -n:]))
                else:
                    kv = self.pending[s][li]
                    parts.append(None if kv is None else (kv[0][0], kv[1][0]))
            layers.append((None, None) if parts[0] is None else _stacked(parts, lengths))
        mask = torch.as_tensor(_padding_mask(lengths), device=self.device)
        for s in seq_ids:
            self.pending.pop(s, None)
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = mask
        self.order = list(seq_ids)

    @torch.inference_mode()
    def tune_threads(self, candidates: list[int], rounds: int = 2, steps: int = 4) -> dict[int, float]:
        """Time single-token decode steps at each intra-op thread count and keep the fastest.

        On a shared CPU a thread count equal to the core count can be several times slower than one thread
        (threads wait on each other's time slices); on an idle machine it is faster. Measuring at start-up picks
        whichever this machine gives. Returns {threads: median step seconds}.
        """
        import time

        seq = -1
        times: dict[int, list[float]] = {n: [] for n in candidates}
        for _ in range(rounds):
            for n in candidates:  # interleaved, so a burst of load elsewhere hits every candidate
                torch.set_num_threads(n)
                self.prefill(seq, list(range(3, 19)))  # 16 tokens
                token = 3
                for _ in range(steps):
                    t0 = time.perf_counter()
                    self.decode([seq], [token])
                    times[n].append(time.perf_counter() - t0)
                self.release(seq)
        self.reset()
        medians = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
        torch.set_num_threads(min(medians, key=medians.get))
        return medians

    def info(self) -> dict:
        from slimlm.models import FFNLayer, decoder_layers, ffn_paths

        layers = decoder_layers(self.model)
        return {
            "backend": self.name,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "layers": len(layers),
            "ffn_layers": [i for i, layer in enumerate(layers) if isinstance(layer, FFNLayer)],
            "ffn_paths": ffn_paths(self.model),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "size_bytes": _model_size_bytes(self.model),
            "threads": torch.get_num_threads(),
            "thread_tuning_ms": getattr(self, "thread_tuning", None),
        }

    def size_bytes(self) -> int:
        return _model_size_bytes(self.model)


def resolve_backend(config) -> str:
    """"torch" or "onnx" for a config whose backend may be "auto" (see `ServeConfig`)."""
    import importlib.util

    if config.backend != "auto":
        return config.backend
    if is_onnx_dir(config.model):
        return "onnx"
    if config.quantize or config.dtype or (config.device or "cpu") != "cpu" or torch.cuda.is_available():
        return "torch"
    if all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx")):
        return "onnx"
    return "torch"


def load_backend(config) -> tuple[Backend, object]:
    """Build the backend a `ServeConfig` asks for: (backend, tokenizer)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if resolve_backend(config) == "onnx":
        if config.backend == "onnx" or is_onnx_dir(config.model):
            return _load_onnx(config)
        from slimlm.models import resolve

        resolve(config.model)  # auto: a bad MODEL is still an error, in one line
        try:
            return _load_onnx(config)
        except Exception as exc:  # auto: a model the exporter cannot take is served by PyTorch instead
            log.warning("ONNX export or load failed (%s); serving with the torch backend",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    from slimlm.models import load_model

    spec = _quantized_dir(config.model, config.quantize) if config.quantize else config.model
    model, tokenizer = load_model(spec, dtype=config.dtype, device=config.device)
    backend = TorchBackend(model, tokenizer, config.max_model_len)
    if not config.threads and backend.device.type == "cpu":
        cores = torch.get_num_threads()
        candidates = sorted({1, max(1, cores // 2), cores})
        if len(candidates) > 1:
            medians = backend.tune_threads(candidates)
            backend.thread_tuning = {str(n): round(1000 * t, 2) for n, t in medians.items()}
            log.info("threads: %d (decode step ms by thread count: %s)", torch.get_num_threads(),
                     backend.thread_tuning)
    return backend, tokenizer


def _load_onnx(config) -> tuple[Backend, object]:
    from slimlm.env import cores_available
    from slimlm.export import OnnxCausalLM
    from slimlm.export.runtime import default_threads

    require("onnxruntime", "onnx")  # before exporting: the export is of no use without it
    if config.quantize:
        raise SlimlmError("--quantize applies to the torch backend; quantize before exporting for onnx")
    weights = config.onnx_weights
    if not is_onnx_dir(config.model) and weights == "auto":
        from slimlm.serve.config import auto_onnx_weights

        weights, why = auto_onnx_weights()
        log.info("ONNX weights: %s (%s; --onnx-weights chooses)", weights, why)
    path = config.model if is_onnx_dir(config.model) else _onnx_dir(config.model, weights)
    threads = int(config.threads or default_threads())
    # onnxruntime's threads on every core: they must not spin there between steps, where the engine samples and
    # the HTTP thread streams the tokens (`spin_stop_reason`)
    stop = threads >= cores_available()
    log.info("ONNX Runtime: %d threads, %s", threads, spin_stop_reason(stop))
    try:
        lm = OnnxCausalLM(path, threads=threads, stop_spinning=stop)
    except SlimlmError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise SlimlmError(f"cannot load ONNX model from {config.model}: {str(exc).splitlines()[0]}") from exc
    from slimlm.serve.onnx_backend import OnnxBackend

    # onnxruntime runs the model on its own threads; torch only samples, at one thread (see
    # slimlm.export.runtime.torch_threads: its idle pool spins on the cores onnxruntime needs)
    torch.set_num_threads(1)
    backend = OnnxBackend(lm, config.max_model_len, path=path, prefix_cache_mb=config.prefix_cache_mb,
                          prefill_chunk=config.prefill_chunk)
    log.info("prefix cache: %s", backend.prefix_reason)
    log.info("long prompts: %s", backend.chunk_reason)
    return backend, lm.tokenizer


def spin_stop_reason(stop: bool) -> str:
    """Why the serve ONNX backend's threads stop spinning after each step, or keep spinning.

    Measured (2-vCPU AMD EPYC, AVX512-VNNI; 7-of-30 SmolLM2, int8; `slimlm bench serve`, 16 requests of 64 tokens,
    3 alternating rounds with llama-server): stopping them gave 8 streams 297-341 tok/s against 247-280 spinning
    (+12% to +22% each round) and a lower time to first token (171-205 ms against 201-237 at 8 streams; 42-47
    against 45-56 ms at one), one stream 116-128 against 105-125 tok/s. With spinning, the threads that ran the
    last step spin on every core while the engine samples and the HTTP thread sends the tokens, and those wait."""
    if stop:
        return "spinning stops after each step (its threads take every core; the server's own threads need one)"
    return "threads spin between steps (cores are left for the server's own threads)"


def _derived_dir(spec: str, kind: str, tag: str):
    """Where the cache keeps what serving derives from MODEL (an export, a quantized copy): keyed by the
    model's path (or id), `tag`, and the files' modification times, so a model rewritten in place is
    derived again instead of served stale."""
    import hashlib
    import os

    from slimlm.models import cache_dir

    local = os.path.expanduser(spec)
    source = os.path.abspath(local) if os.path.exists(local) else spec
    stamp = ""
    if os.path.isdir(source):
        stamp = "|".join(f"{f}:{os.path.getmtime(os.path.join(source, f))}" for f in sorted(os.listdir(source))
                         if f.endswith((".json", ".safetensors")))
    digest = hashlib.sha256(f"{source}|{tag}|{stamp}".encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{os.path.basename(source.rstrip('/')) or 'model'}-{tag}-{digest}"


def _onnx_dir(spec: str, weights: str) -> str:
    """Export MODEL once through `slimlm.export.export_onnx` into the cache; later starts reuse it."""
    from slimlm.export import OnnxConfig, export_onnx, exported_with
    from slimlm.models import resolve

    resolve(spec)  # a bad MODEL fails here in one line
    out = _derived_dir(spec, "serve-onnx", weights)
    config = OnnxConfig(weights=weights)
    if not (out / "model.onnx").is_file() or not exported_with(out, config):
        log.info("exporting %s to ONNX (%s weights) into %s, once", spec, weights, out)
        export_onnx(spec, out, config, overwrite=True)
    return str(out)


def _quantized_dir(spec: str, method: str) -> str:
    """Quantize MODEL once through `slimlm.export.quantize` into the cache; later starts reuse the directory."""
    from slimlm.export import QuantConfig, quantize

    out = _derived_dir(spec, "serve-quantized", method)
    if not (out / "config.json").is_file():
        quantize(spec, out, QuantConfig(method=method), overwrite=True)
    return str(out)
