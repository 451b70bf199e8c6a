"""Fixtures of the profile tests."""

import pytest


@pytest.fixture(scope="session")
def ffn_dir(tmp_path_factory):
    """A 6-layer tiny Llama whose layers 2-3 are replaced by one FFN slot, saved as `slimlm compress` saves it."""
    from slimlm.models import FFNLayer, decoder_layers, make_ffn, replace_layers, save_model
    from slimlm.testing import tiny_model, tiny_tokenizer

    model = tiny_model(seed=1)
    mlp = decoder_layers(model)[2].mlp
    norm = decoder_layers(model)[2].post_attention_layernorm.weight
    slot = FFNLayer(make_ffn(model.config, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, norm), 2)
    replace_layers(model, [2, 3], slot)
    out = tmp_path_factory.mktemp("profile") / "ffn"
    save_model(model, tiny_tokenizer(), out, report={"selection": {"removed_layers": [2, 3]}, "layers_before": 6})
    return out


@pytest.fixture(scope="session")
def slot_layout():
    """A check, shared by every backend's tests, that the tiny FFN-slot model's report lays its layers out as the
    compression left them: the slot stands for layers 2-3, has no KV cache, and the model is smaller."""

    def check(dense: dict, small: dict) -> None:
        assert [layer["kind"] for layer in small["layers"]] == ["decoder", "decoder", "ffn", "decoder", "decoder"]
        assert [layer["source_layers"] for layer in small["layers"]] == [[0], [1], [2, 3], [4], [5]]
        assert small["memory"]["kv_bytes_per_token_by_layer"][2] == 0
        # 2 (key, value) x 2 kv heads x head dim 16 x 4 bytes per attention layer
        assert dense["memory"]["kv_bytes_per_token"] == 6 * 2 * 2 * 16 * 4
        assert small["memory"]["kv_bytes_per_token"] == 4 * 2 * 2 * 16 * 4
        assert small["memory"]["weights_bytes"] < dense["memory"]["weights_bytes"]

    return check
