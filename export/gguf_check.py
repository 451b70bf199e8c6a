"""llama.cpp's side of the GGUF export, through llama-cpp-python (a peer, never a dependency): its quantizer, and
a check of an exported file against the PyTorch model.

`quantize_llama_cpp` runs `llama_model_quantize` (what `llama-quantize` runs) on an f32 GGUF. `validate` loads
the file with llama.cpp, tokenizes `TOKENIZER_SAMPLE` and "Hello world" with and without special tokens as the
Hugging Face tokenizer does, scores the validation text (perplexity against PyTorch's, within `PPL_BARS`) and
decodes greedily from its first 32 tokens: f32/f16/bf16 must give PyTorch's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.errors import SlimlmError

LLAMA_CPP_HINT = ("pip install llama-cpp-python (llama.cpp's quantizer; build it from source with "
                  "--no-binary llama-cpp-python for a native CPU build)")

# Validation. The sample exercises what a tokenizer mismatch breaks first: digit runs (smollm splits them one by
# one), special tokens in text, leading/double spaces, accents, newlines.
TOKENIZER_SAMPLE = ("<|im_start|>user\nIn 1987, 12 345 people paid $6.50 each -- café, naïve, Zürich.\n"
                    "  Two  spaces, a tab\tand 'quotes' don't split.<|im_end|>\n")
VALIDATE_GREEDY = 16
# Perplexity of the file over PyTorch's (fp32) on the validation text, per type: the bar a correct file stays
# under. f32/f16/bf16 differ only by float rounding; q8_0 by ~0.1-1%; 4-6 bit k-quants by a few percent on
# SmolLM2-135M's 7-layer compression; 2-3 bit types by more. A broken file (a wrong permutation, a wrong tokenizer)
# gives ratios of 2 to 1000.
PPL_BARS = {"f32": 1.001, "f16": 1.01, "bf16": 1.03, "q8_0": 1.05, "q6_k": 1.10, "q5_k_m": 1.15, "q5_k_s": 1.15,
            "q5_0": 1.15, "q5_1": 1.15, "q4_k_m": 1.30, "q4_k_s": 1.30, "q4_0": 1.40, "q4_1": 1.40}
PPL_BAR_LOW_BITS = 2.0  # q2_k, q3_k_*: still far below a broken file


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def quantize_llama_cpp(src: Path, dst: Path, kind: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`): f32 GGUF `src` -> `kind` GGUF `dst`."""
    if not llama_cpp_available():
        raise SlimlmError(f"--type {kind} needs llama.cpp's quantizer: {LLAMA_CPP_HINT}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise SlimlmError(f"llama.cpp's quantizer failed ({kind}, code {rc})")


@torch.no_grad()
def validate(path: Path, model, tokenizer, kind: str, threads: int = 0) -> dict:
    """Load `path` with llama.cpp and compare it with the PyTorch `model` (see the module docstring)."""
    import contextlib
    import io
    import math

    import llama_cpp

    from slimlm.export.onnx import VALIDATE_PROMPT

    with contextlib.redirect_stderr(io.StringIO()):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                              n_threads=threads or None, n_threads_batch=threads or None)
    hf_ids = tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"]
    cpp_ids = llm.tokenize(TOKENIZER_SAMPLE.encode(), add_bos=False, special=True)
    hf_full = tokenizer("Hello world")["input_ids"]
    cpp_full = llm.tokenize(b"Hello world", add_bos=True, special=True)
    ids = tokenizer(VALIDATE_PROMPT, add_special_tokens=False)["input_ids"][:256]
    llm.reset()
    llm.eval(ids)
    cpp_logits = torch.from_numpy(llm.scores[: len(ids)].copy()).float()
    ref_logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    def ppl(logits):
        logp = torch.log_softmax(logits[:-1], dim=-1)
        return math.exp(-float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).mean()))

    prompt = ids[:32]
    llm.reset()
    llm.eval(prompt)
    cpp_tokens = []
    for _ in range(VALIDATE_GREEDY):
        cpp_tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([cpp_tokens[-1]])
    seq = torch.tensor([prompt])
    for _ in range(VALIDATE_GREEDY):  # plain forward, no cache: the reference
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    ref_tokens = seq[0, len(prompt):].tolist()
    cos = torch.nn.functional.cosine_similarity(cpp_logits, ref_logits, dim=-1)
    result = {"type": kind, "llama_cpp": _llama_cpp_version(),
              "tokenizer_match": cpp_ids == hf_ids, "special_tokens_match": cpp_full == hf_full,
              "greedy_tokens": VALIDATE_GREEDY, "greedy_match": cpp_tokens == ref_tokens,
              "logits_cosine": float(cos.mean()), "top1_agreement":
                  float((cpp_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
              "max_abs_diff": float((cpp_logits - ref_logits).abs().max()),
              "ppl": ppl(cpp_logits), "ppl_torch": ppl(ref_logits), "ppl_tokens": len(ids)}
    result["ppl_ratio"] = result["ppl"] / result["ppl_torch"]
    result["ppl_bar"] = PPL_BARS.get(kind, PPL_BAR_LOW_BITS)
    failures = []
    if not result["tokenizer_match"]:
        failures.append(f"llama.cpp tokenizes the sample differently: {cpp_ids[:12]}... vs {hf_ids[:12]}...")
    if not result["special_tokens_match"]:
        failures.append(f"llama.cpp adds different special tokens: {cpp_full} vs {hf_full}")
    if kind in ("f32", "f16", "bf16") and not result["greedy_match"]:
        failures.append(f"greedy tokens differ: llama.cpp {cpp_tokens} vs torch {ref_tokens}")
    if result["ppl_ratio"] > result["ppl_bar"]:
        failures.append(f"perplexity {result['ppl']:.3f} vs torch {result['ppl_torch']:.3f} "
                        f"(x{result['ppl_ratio']:.3f} > x{result['ppl_bar']})")
    result["passed"], result["failures"] = not failures, failures
    llm.close() if hasattr(llm, "close") else None
    return result


def _llama_cpp_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None
