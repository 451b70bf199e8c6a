"""The real SmolLM2-135M weights, cut to 6 layers with layers 2-3 replaced by one FFN (initialised from layer 2's
MLP: the structure of a streamline+ffn compression, without its training, to stay within a CI minute):
ONNX fp32 and int4 exports validate against PyTorch and generate the same greedy tokens (fp32)."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

KEEP_LAYERS = 6


@pytest.fixture(scope="module")
def real_compressed():
    import slimlm
    from slimlm.errors import SlimlmError
    from slimlm.models import FFNLayer, make_ffn, replace_layers

    try:
        model, tok = slimlm.load_model("smollm2-135m", fused=False)
    except SlimlmError as exc:
        pytest.skip(f"real model unavailable: {exc}")
    replace_layers(model, list(range(KEEP_LAYERS, len(model.model.layers))))
    src = model.model.layers[2]
    ffn = make_ffn(model.config, src.mlp.gate_proj.weight, src.mlp.up_proj.weight, src.mlp.down_proj.weight,
                   src.post_attention_layernorm.weight)
    replace_layers(model, [2, 3], FFNLayer(ffn, 2))
    return model, tok


@pytest.fixture(scope="module")
def real_dense():
    import slimlm
    from slimlm.errors import SlimlmError

    try:
        return slimlm.load_model("smollm2-135m", fused=False)
    except SlimlmError as exc:
        pytest.skip(f"real model unavailable: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_real_compressed_onnx(real_compressed, weights, tmp_path):
    from slimlm.export.onnx import OnnxConfig, export_onnx
    from slimlm.export.runtime import OnnxCausalLM

    model, tok = real_compressed
    out = tmp_path / weights
    report = export_onnx(None, out, OnnxConfig(weights=weights), model=model, tokenizer=tok)["onnx"]
    assert report["ffn_layers"] == [2] and len(report["kv_layers"]) == KEEP_LAYERS - 2
    assert report["validation"]["passed"]
    saved = json.loads((out / "slimlm.json").read_text())["onnx"]
    assert saved["validation"]["checks"] == report["validation"]["checks"]
    if weights == "fp32":
        prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert OnnxCausalLM(out, threads=2).generate(prompt, 12, stop_at_eos=False) == seq[0, len(prompt):].tolist()


@pytest.mark.slow
def test_real_int8_serving_is_batch_invariant(real_dense, tmp_path):
    """The server's CPU default (int8 weights, fused attention) on real weights: 8 greedy requests sent together
    give the tokens they give one at a time (they differed in 3 of 8 before right padding)."""
    from slimlm.export.onnx import OnnxConfig, export_onnx
    from slimlm.export.runtime import OnnxCausalLM
    from slimlm.serve.engine import Engine, GenRequest
    from slimlm.serve.onnx_backend import OnnxBackend
    from slimlm.serve.sampling import SamplingParams

    model, tok = real_dense
    export_onnx(None, tmp_path / "int8", OnnxConfig(weights="int8"), model=model, tokenizer=tok)
    engine = Engine(OnnxBackend(OnnxCausalLM(tmp_path / "int8", threads=2)), tok, max_batch=8)
    engine.start()
    # prompts of different lengths: the rows of a batch are padded to each other
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write one sentence about the number {n}."}],
                                       add_generation_prompt=True) for n in (1, 22, 333, 4444, 55555, 666666,
                                                                             7777777, 88888888)]
    prompts = [p if isinstance(p, list) else list(p["input_ids"]) for p in prompts]

    def run(group: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in group}

        def sink(i):
            def f(event):
                if event["type"] == "delta":
                    out[i].extend(event["token_ids"])
                assert event["type"] != "error", event
            return f

        for i in group:
            engine.submit(GenRequest(prompts[i], SamplingParams(temperature=0.0), 48, sink(i)))
        assert engine.wait_idle(120)
        return out

    try:
        alone = {}
        for i in range(8):
            alone.update(run([i]))
        assert engine.max_batch_seen == 1
        together = run(list(range(8)))
    finally:
        engine.stop(drain=False)
    assert engine.max_batch_seen >= 4  # they did share decode steps
    assert all(len(alone[i]) > 0 for i in range(8))
    assert together == alone
    # the serve defaults on top: the prefix cache (the chat template's opening is shared) and prompts in parts
    # between decode steps (parts of 16 tokens here, so these prompts take them): still the tokens of each alone
    backend = OnnxBackend(OnnxCausalLM(tmp_path / "int8", threads=2), prefix_cache_mb=64, prefill_chunk=16)
    assert backend.prefix is not None and backend.prefill_chunk == 16, backend.prefix_reason
    engine = Engine(backend, tok, max_batch=8)
    engine.start()
    try:
        cached = run(list(range(8)))
    finally:
        engine.stop(drain=False)
    assert backend.prefix.hits >= 7 and cached == alone
