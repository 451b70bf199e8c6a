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
