"""Validation of an exported graph against the PyTorch model it came from.

`validate` runs the graph (`OnnxCausalLM`) and the model on the same prompt, compares logits at several past
lengths and greedy tokens, and says whether they agree within `TOLERANCES[weights]`. It raises nothing: the stage
(`export_onnx`) decides what a failure means.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.export.onnx_trace import DecoderWithPast, kv_shape

# Validation bars per weight type, compared with the fp32 PyTorch model on the same tokens.
# fp32: only float reassociation differs (measured ~1e-5 on the tiny models, ~1e-4 on SmolLM2-135M), so the
# bar on max |diff| is loose enough for 30 layers yet far below a real bug (which moves logits by >0.1);
# top-1 must agree everywhere and greedy tokens must be identical.
# fp16: 11-bit mantissa weights and activations. int8 / int4: the quantization error itself, measured on
# SmolLM2-135M and on random tiny models; the bars sit below those measurements with a margin, and
# far above what a broken graph gives (cosine ~0, top-1 agreement ~1/V). "min_cosine" bars the mean over
# positions of the per-position logit cosine (the minimum is recorded too).
TOLERANCES = {
    "fp32": {"max_abs_diff": 1e-2, "min_cosine": 0.99999, "min_top1": 1.0},
    "fp16": {"max_abs_diff": None, "min_cosine": 0.999, "min_top1": 0.9},
    "int8": {"max_abs_diff": None, "min_cosine": 0.98, "min_top1": 0.7},
    "int4": {"max_abs_diff": None, "min_cosine": 0.6, "min_top1": 0.5},
}
# The int4 bar follows the quality target of int4 (WikiText perplexity within ~+10% of fp32) rather than a
# logit-cosine ideal: logit cosine over a 49k vocabulary is a strict measure (the long tail moves). A broken
# graph (wrong scale, wrong layout, a past read wrongly) gives cosine ~0 and top-1 agreement ~1/V.
# Validation: past lengths checked (0 = prefill), tokens stepped after each past, greedy tokens compared.
# 16 tokens a check of ordinary prose: top-1 agreement of a quantized graph is a proportion, and over 4 tokens
# (or the first words of a text, where the model hesitates between near-equal candidates) one near-tie
# flipping is 25 points. Measured on SmolLM2-135M's 7-layer compression, int4 mix, against PyTorch fp32:
# 0.25 over 4 tokens of a 19-token pangram, 0.83-0.88 over 16 to 128 tokens of prose.
VALIDATE_PAST = (0, 1, 7, 32)
VALIDATE_STEP = 16
VALIDATE_GREEDY = 8
VALIDATE_PROMPT = (
    "The river runs for about two hundred miles from the mountains to the sea. In the nineteenth century it "
    "carried timber and grain down to the port, and several market towns grew up along its banks. Today most "
    "of the old mills are gone, but the stone bridges remain, and in summer the water is calm enough for small "
    "boats. The town museum keeps records of the great floods that shaped the valley and its farms."
)


def _compare(ort_logits: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    a, b = ort_logits.float(), ref_logits.float()
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return {"max_abs_diff": float((a - b).abs().max()), "cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


@torch.no_grad()
def validate(onnx_dir: Path, model, tokenizer, weights: str) -> dict:
    """Run the exported graph and the PyTorch model on the same prompt: logits at each past length in
    VALIDATE_PAST (the past built by each runtime itself), then greedy tokens. Raises if outside tolerance."""
    from slimlm.export.runtime import OnnxCausalLM

    tol = TOLERANCES[weights]
    runner = OnnxCausalLM(onnx_dir)
    decoder = DecoderWithPast(model).eval()
    kv_heads, head_dim = kv_shape(model.config)
    ids = tokenizer(VALIDATE_PROMPT, return_tensors="pt")["input_ids"]
    need = max(VALIDATE_PAST) + VALIDATE_STEP
    if ids.shape[1] < need:
        ids = ids.repeat(1, need // ids.shape[1] + 1)
    ids = ids[:, :need]
    empty = [(torch.zeros(1, kv_heads, 0, head_dim),) * 2 for _ in decoder.kv_layers]
    checks = []
    for past_len in VALIDATE_PAST:
        step = ids[:, past_len:past_len + VALIDATE_STEP]
        total = past_len + step.shape[1]
        mask = torch.ones(1, total, dtype=torch.long)
        pos = torch.arange(past_len, total)[None]
        ref_past, ort_past = empty, None
        if past_len:
            _, ref_past = decoder(ids[:, :past_len], mask[:, :past_len], torch.arange(past_len)[None], empty)
            _, ort_past = runner.step(ids[:, :past_len], mask[:, :past_len], torch.arange(past_len)[None], None)
        ref_logits, _ = decoder(step, mask, pos, ref_past)
        ort_logits, _ = runner.step(step, mask, pos, ort_past)
        checks.append({"past_len": past_len, "tokens": int(step.shape[1]), **_compare(ort_logits, ref_logits)})
    prompt = ids[0, :VALIDATE_PAST[-1] + 1].tolist()
    ort_tokens = runner.generate(prompt, VALIDATE_GREEDY, stop_at_eos=False)
    seq = torch.tensor([prompt])
    for _ in range(VALIDATE_GREEDY):  # PyTorch greedy without any cache: the plain forward is the reference
        seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    ref_tokens = seq[0, len(prompt):].tolist()
    same = sum(a == b for a, b in zip(ort_tokens, ref_tokens))
    result = {"weights": weights, "tolerance": tol, "checks": checks, "greedy_tokens": VALIDATE_GREEDY,
              "greedy_match": ort_tokens == ref_tokens, "greedy_same_prefix_fraction": _prefix(ort_tokens, ref_tokens),
              "greedy_same_fraction": same / max(len(ref_tokens), 1)}
    failures = []
    for c in checks:
        if tol["max_abs_diff"] is not None and c["max_abs_diff"] > tol["max_abs_diff"]:
            failures.append(f"past {c['past_len']}: max |diff| {c['max_abs_diff']:.3g} > {tol['max_abs_diff']}")
        if c["cosine"] < tol["min_cosine"]:
            failures.append(f"past {c['past_len']}: cosine {c['cosine']:.5f} < {tol['min_cosine']}")
        if c["top1_agreement"] < tol["min_top1"]:
            failures.append(f"past {c['past_len']}: top-1 agreement {c['top1_agreement']:.2f} < {tol['min_top1']}")
    if weights == "fp32" and not result["greedy_match"]:
        failures.append(f"greedy tokens differ: onnx {ort_tokens} vs torch {ref_tokens}")
    result["passed"] = not failures
    result["failures"] = failures
    return result


def _prefix(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(b), 1)
