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
