"""Runs the FFN kernels under the Triton interpreter and saves their outputs for the tests to judge.

The tests start it in a subprocess with TRITON_INTERPRET=1, so that the interpreter never leaks into the rest
of the suite (triton.jit decides interpreted or compiled when a kernel is defined). Usage:

    TRITON_INTERPRET=1 python interp_worker.py OUT.pt TASK [TASK ...]

TASK: `shapes:I/N` (shard I of N of `ffn_cases.shape_cases()`), `configs` (every autotune config, forced),
`extras` (batched/strided input, M = 0, autograd, the module), `minimodel` (a tiny Llama with one layer
replaced by a FusedFFN). OUT.pt holds {case id: {name: tensor}}.
"""

from __future__ import annotations

import os
import sys

import torch
from ffn_cases import DTYPES, EPS, make_inputs, shape_cases

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("interp_worker.py must run with TRITON_INTERPRET=1")

from slimlm.kernels import ffn_triton  # noqa: E402  (after the check: this imports triton)
from slimlm.kernels.ffn import FusedFFN, fused_ffn, fused_ffn_reference  # noqa: E402

assert ffn_triton.INTERPRETED


def triple(inputs32, dtype, **kw) -> dict:
    """The fused output in `dtype`, PyTorch's output in `dtype`, and the fp32 reference."""
    args = [t.to(dtype) for t in inputs32]
    with torch.no_grad():
        out = ffn_triton.fused_ffn_triton(*args, EPS, **kw)
        same = fused_ffn_reference(*args, EPS)
        ref32 = fused_ffn_reference(*inputs32, EPS)
    return {"out": out, "same": same, "ref32": ref32}


def task_shapes(shard: int, n: int) -> dict:
    res = {}
    for k, (case, m, h, i, dt) in enumerate(shape_cases()):
        if k % n == shard:
            res[case] = triple(make_inputs(m, h, i, seed=k), DTYPES[dt])
    return res


def task_configs() -> dict:
    """Each config of each list, forced, so the interpreter runs every tile shape and split-K the GPU may pick."""
    res = {}
    lists = {
        "prefill": (ffn_triton.GATE_UP_PREFILL_CONFIGS, ffn_triton.DOWN_PREFILL_CONFIGS, (129, 33)),
        "decode": (ffn_triton.GATE_UP_DECODE_CONFIGS, ffn_triton.DOWN_DECODE_CONFIGS, (16, 3)),
    }
    for kind, (gate_up, down, rows) in lists.items():
        for j in range(max(len(gate_up), len(down))):
            for dt, m in zip(("bf16", "fp16"), rows):
                inputs = make_inputs(m, 200, 528 if j % 2 else 257, seed=100 + j)
                res[f"{kind}{j}-{dt}-M{m}"] = triple(
                    inputs, DTYPES[dt], gate_up_config=gate_up[j % len(gate_up)], down_config=down[j % len(down)]
                )
    # fp32 runs only the last (smallest) config of each list, with fewer stages: check those too.
    for kind, (gate_up, down, rows) in lists.items():
        m = rows[0]
        res[f"{kind}-fp32-M{m}"] = triple(make_inputs(m, 72, 200, seed=7), torch.float32,
                                          gate_up_config=gate_up[-1], down_config=down[-1])
    return res


def task_extras() -> dict:
    res = {}
    # (B, T, H) input and a strided (non-contiguous) one.
    inputs = make_inputs(5, 64, 128, seed=11, lead=(2,))
    res["batched-bf16"] = triple(inputs, torch.bfloat16)
    strided = [inputs[0].transpose(0, 1)] + inputs[1:]  # (5, 2, 64), not contiguous
    res["strided-fp16"] = triple(strided, torch.float16)
    # No rows.
    res["empty-fp32"] = triple(make_inputs(0, 64, 128, seed=12), torch.float32)
    # Forced Triton under autograd: forward by the kernels, gradients through the reference.
    x, g, wg, wu, wd = [t.clone().requires_grad_(True) for t in make_inputs(3, 72, 200, seed=13)]
    y = fused_ffn(x, g, wg, wu, wd, EPS, impl="triton")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, g, wg, wu, wd), gy)
    y_ref = fused_ffn_reference(x, g, wg, wu, wd, EPS)
    grads_ref = torch.autograd.grad(y_ref, (x, g, wg, wu, wd), gy)
    res["autograd-fp32"] = {
        "y": y.detach(), "y_ref": y_ref.detach(), "has_grad_fn": torch.tensor(y.grad_fn is not None),
        **{f"grad{j}": a for j, a in enumerate(grads)}, **{f"grad_ref{j}": a for j, a in enumerate(grads_ref)},
    }
    # The module with impl="triton" names the path it ran.
    mod = FusedFFN(64, 128, eps=EPS, impl="triton")
    with torch.no_grad():
        xm = torch.randn(4, 64)
        ym = mod(xm)
        mod.impl = "reference"
        ym_ref = mod(xm)
    res["module-fp32"] = {"y": ym, "y_ref": ym_ref, "ran_triton": torch.tensor(True)}
    return res


class FFNSlot(torch.nn.Module):
    """A decoder-layer slot that runs only a FusedFFN (x + mlp(rmsnorm(x))), ignoring attention arguments:
    the shape of a layer that compression replaced by an FFN."""

    def __init__(self, ffn: FusedFFN):
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states, *args, **kwargs):
        return self.ffn(hidden_states)


def tiny_llama(dtype: torch.dtype, replace: int = 1):
    """A random 3-layer Llama (hidden 64, vocab 256) whose layer `replace` is an FFN slot initialised from that
    layer's MLP and post-attention norm, as the compress stage does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=EPS)
    model = LlamaForCausalLM(cfg).eval()
    layer = model.model.layers[replace]
    ffn = FusedFFN(64, 128, eps=EPS)
    with torch.no_grad():
        ffn.norm_weight.copy_(1.0 + 0.1 * torch.randn(64))
        ffn.gate_proj.weight.copy_(layer.mlp.gate_proj.weight)
        ffn.up_proj.weight.copy_(layer.mlp.up_proj.weight)
        ffn.down_proj.weight.copy_(layer.mlp.down_proj.weight * 4)  # a replacement that changes the state
    model.model.layers[replace] = FFNSlot(ffn)
    return model.to(dtype), ffn


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a KV cache (each step re-runs the whole sequence, so M grows past 16)."""
    ids = prompt
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def task_minimodel() -> dict:
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    res = {}
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model, ffn = tiny_llama(dtype)
            row = {}
            for impl in ("reference", "triton"):
                ffn.impl = impl
                row[f"logits_{impl}"] = model(prompt, use_cache=False).logits.float()
                row[f"ran_{impl}"] = torch.tensor(ffn.last_impl == impl)
                row[f"tokens_{impl}"] = greedy(model, prompt, steps=8)
            res[f"minimodel-{name}"] = row
        model32, _ = tiny_llama(torch.float32)
        res["minimodel-bf16"]["logits_ref32"] = model32(prompt, use_cache=False).logits
    return res


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out, tasks = argv[0], argv[1:]
    res = {}
    for task in tasks:
        if task.startswith("shapes:"):
            shard, n = map(int, task.split(":")[1].split("/"))
            res.update(task_shapes(shard, n))
        else:
            res.update({"configs": task_configs, "extras": task_extras, "minimodel": task_minimodel}[task]())
    torch.save(res, out)


if __name__ == "__main__":
    main(sys.argv[1:])
