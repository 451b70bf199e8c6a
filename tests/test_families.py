"""The family table describes every supported model as transformers builds it: each path resolves, the layer
computes what `Family` says, and a removal keeps the per-layer config lists in step."""

import pytest
import torch

from slimlm.families import (
    FAMILIES,
    causal_mask,
    decoder_layers,
    embed_tokens,
    family_of,
    get_attr,
    rotary_for,
    sliding_window,
)
from slimlm.surgery import replace_layers
from slimlm.testing import FAMILY_CONFIGS, tiny_model

MODEL_PATHS = ("layers", "embed", "final_norm", "rotary", "head")
LAYER_PATHS = ("attn", "attn_out", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_norm", "attn_k_norm", "mlp",
               "mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up", "input_norm", "mlp_norm", "attn_out_norm",
               "mlp_out_norm")


def test_every_family_has_a_tiny_model():
    assert set(FAMILIES) == set(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_path_resolves_and_the_layer_computes_what_the_row_says(family):
    model = tiny_model(family, layers=3)
    fam = family_of(model)
    for name in MODEL_PATHS:
        get_attr(model, getattr(fam, name))
    layer = decoder_layers(model)[1]
    for name in LAYER_PATHS:
        path = getattr(fam, name)
        if path is not None:
            assert isinstance(get_attr(layer, path), torch.nn.Module), name
    # the block as the row describes it, against the layer itself
    torch.manual_seed(0)
    h = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    rope = rotary_for(model, h, pos, 1)
    mask = causal_mask(5, 5, sliding_window(model, 1), h.dtype)

    def out_norm(path, x):
        return x if path is None else get_attr(layer, path)(x)

    with torch.no_grad():
        want = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope, use_cache=False)
        want = want[0] if isinstance(want, tuple) else want
        attn = get_attr(layer, fam.attn)(get_attr(layer, fam.input_norm)(h), attention_mask=mask,
                                         position_embeddings=rope)[0]
        x = h + out_norm(fam.attn_out_norm, attn)
        got = x + out_norm(fam.mlp_out_norm, get_attr(layer, fam.mlp)(get_attr(layer, fam.mlp_norm)(x)))
    torch.testing.assert_close(got, want)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(embed_tokens(model, ids), model.get_input_embeddings()(ids))


def test_a_removal_keeps_each_remaining_layer_type():
    model = tiny_model("qwen2", layers=4)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    replace_layers(model, [1, 2])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_by_layer_with_the_tables_masks_and_rotary_is_the_model(family):
    """Every layer run with its own rotary table and window (12 tokens cross the tiny sliding window of 8)
    gives the model's own hidden states: what stage code that runs layers one at a time relies on."""
    model = tiny_model(family, layers=4)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        h = embed_tokens(model, ids)
        pos = torch.arange(12)[None].expand(2, 12)
        for i, layer in enumerate(decoder_layers(model)):
            torch.testing.assert_close(h, want[i])
            mask = causal_mask(12, 12, sliding_window(model, i), h.dtype)
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary_for(model, h, pos, i),
                        use_cache=False)
            h = out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_scoring_is_the_models_own_log_softmax(family):
    """Perplexity's decoder-then-head path gives the model's own next-token log-probabilities (Gemma 2's final
    soft-cap included)."""
    from slimlm.evaluate import next_token_logprobs

    model = tiny_model(family, layers=2)
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping = 0.5  # a cap that bends the tiny model's logits (|x| < 1) visibly
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = next_token_logprobs(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
