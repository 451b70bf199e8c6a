"""Run an exported decoder (`slimlm export onnx`) with ONNX Runtime: one step API and a generate loop.

`OnnxCausalLM(path)` opens OUT/model.onnx with the CUDA execution provider when onnxruntime has it and a GPU
is present, else the CPU one. Session options are chosen, not left to chance: all graph optimizations (fusions,
constant folding), intra-op threads = the cores this process may use (or `threads`), one inter-op
thread and sequential execution (a decoder step is a chain of dependent ops: parallel execution only
adds scheduling overhead).

`step(input_ids, attention_mask, position_ids, past)` is what the server drives: it returns the
logits as a torch tensor and the new cache, an opaque list of per-attention-layer (key, value) numpy
arrays to pass back as `past` (None means empty). FFN replacement layers have no cache entry at all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from slimlm.errors import SlimlmError, require


def _as_int64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.int64)
    return x[None] if x.ndim == 1 else x


@contextlib.contextmanager
def torch_threads(n: int):
    """torch at `n` intra-op threads inside the block, as before after it.

    Beside ONNX Runtime, torch only samples from the logits; an argmax over a vocabulary of 49k is enough for
    it to wake its OpenMP pool, whose threads then spin for a while on the cores onnxruntime's threads need.
    Measured on a 2-vCPU AMD EPYC (int4 export of the 7-of-30 SmolLM2, 128 greedy tokens): 132 tok/s with torch
    at 2 threads, 147 at 1.
    """
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def is_onnx_dir(spec) -> bool:
    """Whether `spec` is a directory holding an ONNX export (its model.onnx)."""
    return (Path(spec).expanduser() / "model.onnx").is_file()


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    from slimlm.env import cores_available

    return cores_available()


def default_providers(available: list[str]) -> list[str]:
    """CUDA, then CPU, where this onnxruntime has CUDA and a GPU is there. onnxruntime-gpu lists the CUDA
    provider on machines without a GPU or without CUDA's libraries too, and trying it there logs an error
    before falling back to the CPU: so CUDA is asked for only where torch sees a device."""
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


class OnnxCausalLM:
    """A causal LM exported by `export_onnx`, run by ONNX Runtime.

    path: the export directory. providers: onnxruntime execution providers in order of preference
    (default: `default_providers`). threads: intra-op threads on CPU. profile_prefix: run the session under
    onnxruntime's profiler, its JSON trace written at `self.session.end_profiling()` (slimlm profile).
    stop_spinning: the intra-op threads stop spinning at the end of each run (onnxruntime's
    `session.force_spinning_stop`), where other work needs the cores between runs: another session's runs
    (slimlm profile's plain and profiled pair) or the caller's own threads (slimlm serve's engine and HTTP threads
    when onnxruntime takes every core).
    """

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None,
                 profile_prefix: str | None = None, stop_spinning: bool = False):
        ort = require("onnxruntime", "onnx")
        from transformers import AutoConfig, AutoTokenizer

        from slimlm.models import read_slimlm_json

        self.path = Path(path).expanduser()
        info = read_slimlm_json(self.path).get("onnx")
        if not info or not (self.path / info.get("file", "model.onnx")).is_file():
            raise SlimlmError(f"{path} is not an ONNX export of slimlm (no model.onnx or no 'onnx' in slimlm.json)")
        self.info = info
        self.config = AutoConfig.from_pretrained(str(self.path))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        available = ort.get_available_providers()
        if providers is None:
            providers = default_providers(available)
        missing = [p for p in providers if p not in available]
        if missing:
            raise SlimlmError(f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = int(threads or default_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: ORT warns about every CPU fallback of a shape op on CUDA
        if stop_spinning:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        if profile_prefix:  # onnxruntime's profiler: every node's kernel time, written by end_profiling()
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        self.threads = opts.intra_op_num_threads
        self.session = ort.InferenceSession(str(self.path / info.get("file", "model.onnx")), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.n_kv = len(info["kv_layers"])
        self.kv_heads, self.head_dim = int(info["kv_heads"]), int(info["head_dim"])
        self.kv_dtype = np.float16 if info.get("kv_dtype") == "float16" else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        from slimlm.export.onnx_trace import LOGITS_TO_KEEP

        # graphs exported since `logits_to_keep` compute the head for the last positions asked only
        # (an input with a default is one of the session's overridable initializers, not of its inputs)
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in [*self.session.get_inputs(),
                                                                 *self.session.get_overridable_initializers()]}
        self.max_positions = int(info.get("max_positions") or 0)  # fused attention: its rotary table's rows
        self.fused = info.get("attention") == "fused"
        # the attention nodes rotate q and k themselves (`fold_into_attention`); onnxruntime's kernel then reads a
        # first prompt's positions from the first one on, so a row's positions count from its first slot
        self.slot_positions = bool((info.get("fusions") or {}).get("rotary_into_attention"))
        # rows of a batch may be right-padded (valid slots first), each then computed exactly as alone: the fused
        # graphs since their slimlm.json says so; older or plain graphs take left padding only
        self.right_padding = info.get("padding") == "right"
        eos = self.config.eos_token_id if self.config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.n_kv)]

    def step(self, input_ids, attention_mask, position_ids, past=None, last: int | None = None):
        """One forward over new tokens. input_ids, position_ids: (B, T); attention_mask: (B, P+T) covering the past
        and the new tokens (0 for padding); past: None or the `present` of the previous step. Padding goes first in
        a row (left) or, where `right_padding`, may go last: a row's n valid slots first, its new tokens written at
        n.. in the present (the mask of the next step has n + T ones first).
        Returns (logits: torch.FloatTensor (B, T, V), present)."""
        ids = _as_int64(input_ids)
        positions = _as_int64(position_ids)
        mask = _as_int64(attention_mask)
        if self.slot_positions and mask.size and not mask[:, 0].all():
            # left padding: a row's positions as the slots it fills (the same attention, rotary being relative)
            positions = positions + np.argmax(mask != 0, axis=1)[:, None]
        if self.max_positions and positions.size and int(positions.max()) >= self.max_positions:
            raise ValueError(f"position {int(positions.max())} is past this graph's rotary table "
                             f"({self.max_positions} positions)")
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if last is not None and self.keeps_logits:
            if last < 1:
                raise ValueError(f"last must be at least 1, got {last}")
            from slimlm.export.onnx_trace import LOGITS_TO_KEEP

            feed[LOGITS_TO_KEEP] = np.array([last], dtype=np.int64)
        if past is None or any(kv is None for kv in past):
            past = self.empty_past(ids.shape[0])
        elif self.fused and ids.shape[0] > 1 and ids.shape[1] > 1 and past and past[0][0].shape[2] > 0:
            raise ValueError("this graph's fused attention (onnxruntime GroupQueryAttention) takes several new "
                             "tokens over a past only at batch 1: step rows one at a time, or export with "
                             "--attention plain")
        if len(past) != self.n_kv:
            raise ValueError(f"past has {len(past)} entries, the graph has {self.n_kv} attention layers")
        for j, (key, value) in enumerate(past):
            feed[f"past_key_values.{j}.key"] = key
            feed[f"past_key_values.{j}.value"] = value
        outs = self.session.run(self.output_names, feed)
        present = [(outs[1 + 2 * j], outs[2 + 2 * j]) for j in range(self.n_kv)]
        return torch.from_numpy(outs[0]).float(), present

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 share_buffer: bool = True) -> list[int]:
        """Generate up to `max_new_tokens` after one prompt (list of ids, or a (1, T) / (T,) tensor); returns the
        new token ids (the eos token included when it ends the text). share_buffer: decode with the key/value cache
        in one preallocated buffer per layer that the graph writes in place (`shares_buffer`), else by `step`."""
        prompt = _as_int64(input_ids)
        if prompt.shape[0] != 1:
            raise ValueError("generate takes one prompt; use step() for batches")
        with torch_threads(1):
            return self._generate(prompt, max_new_tokens, do_sample, temperature, top_p, seed, stop_at_eos,
                                  share_buffer)

    def shares_buffer(self, length: int) -> bool:
        """A batch-1 decode of `length` positions can keep its cache in place: onnxruntime's GroupQueryAttention
        (the fused graphs) writes each new key/value into a past buffer bound as its own present, on the CPU."""
        return (self.fused and self.providers[:1] == ["CPUExecutionProvider"]
                and 0 < length <= (self.max_positions or length))

    def _generate(self, prompt, max_new_tokens, do_sample, temperature, top_p, seed, stop_at_eos,
                  share_buffer=True) -> list[int]:
        from slimlm.serve.sampling import Sampler, SamplingParams

        n = prompt.shape[1]
        logits, past = self.step(prompt, np.ones((1, n), np.int64), np.arange(n)[None], None, last=1)
        # the server's sampler (temperature 0 is greedy)
        params = SamplingParams(temperature=temperature if do_sample else 0.0, top_p=top_p, seed=seed)
        sampler = Sampler(params, prompt[0].tolist(), vocab=logits.shape[-1])
        cache = mask = None
        if share_buffer and max_new_tokens > 1 and self.shares_buffer(n + max_new_tokens):
            cache = InPlaceCache(self, past, n + max_new_tokens)
            mask = np.zeros((1, cache.capacity), np.int64)
            mask[0, :n] = 1
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = sampler(logits[0, -1])[0]
            out.append(token)
            if stop_at_eos and token in self.eos_token_ids:
                break
            if len(out) == max_new_tokens:
                break
            n += 1
            if cache is not None:
                mask[0, n - 1] = 1
                logits = cache.run(np.array([[token]], np.int64), mask, np.array([[n - 1]], np.int64))
            else:
                logits, past = self.step(np.array([[token]]), np.ones((1, n), np.int64), np.array([[n - 1]]), past)
        return out


class InPlaceCache:
    """Decode steps through an IO binding with each layer's key and value in one (rows, kv_heads, capacity,
    head_dim) buffer whose first `batch` rows are bound as both the past input and the present output, so
    GroupQueryAttention writes each new position in place (no cache copied or allocated per step). A row's valid
    slots come first; the attention mask spans the whole capacity (ones over the row's slots and its new token),
    which gives the graph's `total` the buffer's length, as the kernel expects when past and present share a
    buffer. Rows may be spare (`rows` > batch): a server moves sequences into and out of rows (`put_row`,
    `move_row`, `set_batch`) without reallocating. For the graphs `OnnxCausalLM.shares_buffer` accepts.

    past: per-layer (K, V) numpy arrays (B, kv_heads, w, head_dim), w <= capacity, each row's slots first (B may
    be 0 with `rows` given: nothing bound until `put_row` and `set_batch`).
    """

    def __init__(self, lm: OnnxCausalLM, past, capacity: int, rows: int | None = None):
        self.ort = require("onnxruntime", "onnx")
        self.lm, self.capacity = lm, capacity
        batch = past[0][0].shape[0]
        self.rows = max(int(rows or batch), batch)
        if self.rows < 1:
            raise ValueError("an in-place cache needs at least one row")
        self.io = lm.session.io_binding()
        self.io.bind_output(lm.output_names[0])
        self.buffers = []  # per-layer (K, V) numpy buffers (rows, kv_heads, capacity, head_dim)
        for pair in past:
            bufs = []
            for arr in pair:
                buf = np.zeros((self.rows, lm.kv_heads, capacity, lm.head_dim), lm.kv_dtype)
                buf[:batch, :, :arr.shape[2]] = arr
                bufs.append(buf)
            self.buffers.append(tuple(bufs))
        self.batch = 0
        self._values = []  # the bound OrtValues (views of the first `batch` rows), kept alive here
        # the logits go into a buffer of ours once their shape is known (io.get_outputs() wraps every output, the
        # whole cache included, in Python objects: about 80 us a step for SmolLM2's 47 outputs)
        self._logits: np.ndarray | None = None
        self._logits_value = None
        self._logits_key: tuple | None = None
        if batch:
            self.set_batch(batch)

    @property
    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-layer (K, V) views of the bound rows."""
        return [(k[:self.batch], v[:self.batch]) for k, v in self.buffers]

    def set_batch(self, batch: int) -> None:
        """Bind the first `batch` rows (a view: no copy)."""
        if not 1 <= batch <= self.rows:
            raise ValueError(f"batch {batch} outside 1..{self.rows} rows")
        if batch == self.batch:
            return
        self._values = []
        for j, bufs in enumerate(self.buffers):
            for kind, buf in zip(("key", "value"), bufs):
                value = self.ort.OrtValue.ortvalue_from_numpy(buf[:batch])
                self._values.append(value)
                self.io.bind_ortvalue_input(f"past_key_values.{j}.{kind}", value)
                self.io.bind_ortvalue_output(self.lm.output_names[1 + 2 * j + (kind == "value")], value)
        self.batch = batch

    def put_row(self, row: int, past, n: int) -> None:
        """Copy one sequence's first n slots (per-layer (K, V) of shape (1, kv_heads, >= n, head_dim)) into `row`."""
        for (k, v), (pk, pv) in zip(self.buffers, past):
            k[row, :, :n] = pk[0, :, :n]
            v[row, :, :n] = pv[0, :, :n]

    def move_row(self, src: int, dst: int, n: int) -> None:
        """Copy row `src`'s first n slots into row `dst` (the slots past n in dst are never read: the mask)."""
        for k, v in self.buffers:
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]

    def _unbind_logits(self) -> None:
        self.io.bind_output(self.lm.output_names[0])  # unallocated: onnxruntime allocates them at the next run
        self._logits = self._logits_value = self._logits_key = None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> torch.Tensor:
        """One step of new tokens (batch, T); attention_mask (batch, capacity). Returns logits (batch, T, V)."""
        ids = _as_int64(input_ids)
        key = ids.shape
        if self._logits_key is not None and self._logits_key != key:
            self._unbind_logits()
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("attention_mask", _as_int64(attention_mask))
        self.io.bind_cpu_input("position_ids", _as_int64(position_ids))
        self.lm.session.run_with_iobinding(self.io)
        if self._logits is None:  # first run at this shape: onnxruntime allocated them; ours from the next run on
            out = self.io.get_outputs()[0].numpy()
            self._logits = np.empty_like(out)
            self._logits_value = self.ort.OrtValue.ortvalue_from_numpy(self._logits)
            self.io.bind_ortvalue_output(self.lm.output_names[0], self._logits_value)
            self._logits_key = key
            return torch.from_numpy(out.copy()).float()
        # a copy: the buffer is written again by the next run
        return torch.from_numpy(self._logits.copy()).float()

