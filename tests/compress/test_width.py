"""Width pruning on tiny random models: Taylor importance, the planted structures removed, GQA-consistent shapes,
outputs that plain transformers loads with equal logits, and the CLI's one-line refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.cli import main
from slimlm.compress.width import apply_width, plan_width, prune_width, structure_scores, taylor_gradients
from slimlm.errors import SlimlmError
from slimlm.families import FAMILIES as TABLE
from slimlm.families import family_of, get_attr
from slimlm.models import FFNLayer, count_params, load_model, replace_layers, save_model
from slimlm.testing import tiny_model, tiny_tokenizer

FAMILIES = sorted(TABLE)


def _windows(n=4, t=24, seed=0):
    return torch.randint(3, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def _fp32(monkeypatch):
    """Gradients in float32 (no bfloat16 autocast on CPUs with native bfloat16 units), for exact comparisons."""
    import contextlib

    import slimlm.data

    monkeypatch.setattr(slimlm.data, "fast_autocast", lambda model: contextlib.nullcontext())


def _mlp_weights(layer, fam):
    """Views of (gate, up, down) weights, a fused gate_up projection split (rows gate, then up)."""
    if fam.mlp_gate_up is not None:
        gate, up = get_attr(layer, fam.mlp_gate_up).weight.chunk(2, dim=0)
    else:
        gate, up = get_attr(layer, fam.mlp_gate).weight, get_attr(layer, fam.mlp_up).weight
    return gate, up, get_attr(layer, fam.mlp_down).weight


def _qkv(layer, fam, heads, kv, hd):
    """(weight, bias) views of the q, k and v projections, a fused qkv projection split."""
    if fam.attn_qkv is None:
        projs = [get_attr(layer, path) for path in (fam.attn_q, fam.attn_k, fam.attn_v)]
        return [(p.weight, p.bias) for p in projs]
    proj = get_attr(layer, fam.attn_qkv)
    sizes = [heads * hd, kv * hd, kv * hd]
    biases = proj.bias.split(sizes) if proj.bias is not None else [None] * 3
    return list(zip(proj.weight.split(sizes), biases))


def _attn_params(layer, fam) -> int:
    paths = [fam.attn_qkv] if fam.attn_qkv else [fam.attn_q, fam.attn_k, fam.attn_v]
    return sum(p.numel() for path in paths + [fam.attn_out] for p in get_attr(layer, path).parameters())


def _zero_mlp_channels(layer, idx, fam):
    gate, up, down = _mlp_weights(layer, fam)
    with torch.no_grad():
        gate[idx] = 0
        up[idx] = 0
        down[:, idx] = 0


def _zero_heads(layer, q_heads, kv_heads, hd, fam, heads=4, kv=2):
    """Zero query heads (q rows, q bias, o columns) and key/value heads (k/v rows and biases): they add nothing."""
    (qw, qb), (kw, kb), (vw, vb) = _qkv(layer, fam, heads, kv, hd)
    o = get_attr(layer, fam.attn_out)
    with torch.no_grad():
        for h in q_heads:
            qw[h * hd:(h + 1) * hd] = 0
            o.weight[:, h * hd:(h + 1) * hd] = 0
            if qb is not None:
                qb[h * hd:(h + 1) * hd] = 0
        for j in kv_heads:
            for w, b in ((kw, kb), (vw, vb)):
                w[j * hd:(j + 1) * hd] = 0
                if b is not None:
                    b[j * hd:(j + 1) * hd] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_channels_and_kv_group_are_the_ones_removed(family):
    """Zeroed MLP channels (different ones in every layer) and a zeroed key/value group with its query heads
    have zero Taylor importance: exactly they go, and the model computes the same logits without them."""
    model = tiny_model(family, heads=4, kv_heads=2, intermediate=128)
    fam = family_of(model)
    hd = model.config.head_dim
    planted = []
    for i, layer in enumerate(model.model.layers):
        idx = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(i))[:16].tolist())
        planted.append(idx)
        _zero_mlp_channels(layer, idx, fam)
        _zero_heads(layer, q_heads=[2, 3], kv_heads=[1], hd=hd, fam=fam)
    ids = _windows()
    with torch.no_grad():
        before = model(ids).logits
    total = count_params(model)
    attn = _attn_params(model.model.layers[0], fam)  # half the query heads and half the key/value heads go
    per_layer = 16 * 3 * 64 + attn // 2
    report = prune_width(model, ids, per_layer * len(model.model.layers) / total, round_to=8, progress=False)
    assert report["choice"]["kv_groups_removed"] == 1 and report["choice"]["mlp_channels_removed"] == 16
    assert report["choice"]["score"] == 0.0
    for entry, idx in zip(report["layers"], planted):
        assert entry["mlp_channels_removed"] == idx
        assert entry["kv_heads_removed"] == [1] and entry["q_heads_removed"] == [2, 3]
    assert count_params(model) == total - report["choice"]["params_removed"]
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (112, 2, 1, hd)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before)


def test_planted_query_heads_go_one_per_group():
    """With 4 query heads per key/value head, one zeroed query head in each group is removed, every key/value
    head stays and each keeps 3 query heads."""
    model = tiny_model("llama", heads=8, kv_heads=2, intermediate=128)
    hd = model.config.head_dim
    for layer in model.model.layers:
        _zero_heads(layer, q_heads=[1, 6], kv_heads=[], hd=hd, fam=family_of(model), heads=8)
    ids = _windows()
    with torch.no_grad():
        before = model(ids).logits
    q_head = 2 * hd * 64  # its q rows and o columns
    report = prune_width(model, ids, 2 * q_head * 6 / count_params(model), round_to=8, progress=False)
    assert report["choice"]["q_heads_removed_per_group"] == 1 and report["choice"]["kv_groups_removed"] == 0
    assert all(e["q_heads_removed"] == [1, 6] and e["kv_heads_removed"] == [] for e in report["layers"])
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_shapes_stay_consistent_through_gqa():
    """A deep cut of a 6-head / 2-key-value-head model: every projection agrees with the new config, the MLP width
    is a multiple of round_to, and generation with a KV cache matches recomputing the whole prefix."""
    model = tiny_model("qwen2", hidden=96, heads=6, kv_heads=2, intermediate=256)
    report = prune_width(model, _windows(), 0.45, round_to=32, progress=False)
    cfg = model.config
    hd = cfg.head_dim
    assert hd == 16 and cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.intermediate_size % 32 == 0 and cfg.intermediate_size < 256
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (cfg.num_attention_heads * hd, 96) == (a.q_proj.bias.shape[0], 96)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (cfg.num_key_value_heads * hd, 96)
        assert a.o_proj.weight.shape == (96, cfg.num_attention_heads * hd)
        assert a.num_key_value_groups == cfg.num_attention_heads // cfg.num_key_value_heads
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (cfg.intermediate_size, 96)
        assert m.down_proj.weight.shape == (96, cfg.intermediate_size)
    assert report["after"]["params"] == count_params(model)
    assert abs(report["choice"]["params_removed"] - 0.45 * report["before"]["params"]) <= 32 * 3 * 96 * 6 / 2
    prompt = _windows(1, 6)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq[:, :out.shape[1]])  # (generation may stop early at the end-of-sequence token)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_output_loads_in_plain_transformers_with_equal_logits(tmp_path, family):
    model = tiny_model(family, heads=4, kv_heads=2, intermediate=128)
    report = prune_width(model, _windows(), 0.3, round_to=8, progress=False)
    out = save_model(model, tiny_tokenizer(), tmp_path / "out", {"width": report})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == model.config.intermediate_size < 128
    assert cfg["head_dim"] == 16
    ids = _windows(2, 20, seed=1)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(str(out))
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(plain(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_ffn_replacement_slot_is_pruned_to_the_same_width(tmp_path, family):
    """After depth pruning with an FFN replacement, its channels are cut to the layers' width, so the directory
    still has one intermediate_size and loads in plain transformers with equal logits."""
    from slimlm.compress.replace import new_ffn_slot

    model = tiny_model(family, intermediate=128)
    replace_layers(model, [2, 3], replacement=new_ffn_slot(model, 2))
    prune_width(model, _windows(), 0.25, round_to=8, progress=False)
    slot = model.model.layers[2]
    assert isinstance(slot, FFNLayer)
    assert slot.ffn.up_proj.weight.shape[0] == model.config.intermediate_size < 128
    out = save_model(model, tiny_tokenizer(), tmp_path / "out", {})
    ids = _windows(2, 16, seed=2)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_and_width_output_exports_to_onnx_and_is_served(tmp_path, family):
    """An OUT with an FFN slot and heads and channels pruned: its ONNX export validates, and `slimlm serve` answers
    a chat turn with the same greedy text on the PyTorch and the ONNX backends."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastapi.testclient import TestClient

    from slimlm.compress.replace import new_ffn_slot
    from slimlm.export import OnnxConfig, export_onnx
    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    model = tiny_model(family, layers=6, heads=4, kv_heads=2, intermediate=128)
    for layer in model.model.layers:  # a key/value group of no importance, so that heads go too
        _zero_heads(layer, q_heads=[2, 3], kv_heads=[1], hd=model.config.head_dim, fam=family_of(model))
    replace_layers(model, [2, 3], replacement=new_ffn_slot(model, 2))
    report = prune_width(model, _windows(), 0.3, attention=True, round_to=8, progress=False)
    assert report["after"]["num_attention_heads"] < 4 and report["after"]["intermediate_size"] < 128
    out = save_model(model, tiny_tokenizer(), tmp_path / family, {"width": report})
    onnx_dir = tmp_path / "onnx"
    check = export_onnx(str(out), onnx_dir, OnnxConfig(weights="fp32"))["onnx"]["validation"]
    assert check["passed"] and check["greedy_match"], check["failures"]
    req = {"model": "tiny", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
           "temperature": 0}
    texts = {}
    for backend, path in (("torch", out), ("onnx", onnx_dir)):
        cfg = ServeConfig(model=str(path), backend=backend, served_model_name="tiny", threads=1, max_model_len=128)
        served, tok = load_backend(cfg)
        with TestClient(create_app(cfg, backend=served, tokenizer=tok)) as client:
            r = client.post("/v1/chat/completions", json=req)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
            texts[backend] = r.json()["choices"][0]["message"]["content"]
    assert texts["torch"] == texts["onnx"]


def test_gradients_accumulated_window_by_window_equal_the_full_batch_gradient(monkeypatch):
    _fp32(monkeypatch)
    model = tiny_model("qwen2")
    ids = _windows(4, 16)
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    grads, fisher = taylor_gradients(model, ids, second_order=True, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert all(p.grad is None for p in model.parameters())
    q = model.model.layers[1].self_attn.q_proj
    per_window = []
    for row in ids:
        model.zero_grad()
        with torch.enable_grad():
            model(row[None], labels=row[None]).loss.backward()
        per_window.append((q.weight.grad.clone(), q.bias.grad.clone()))
    for i, p in enumerate((q.weight, q.bias)):
        g = torch.stack([w[i] for w in per_window])
        torch.testing.assert_close(grads[p], g.mean(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fisher[p], g.square().mean(0), rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("importance", ["element1", "vector"])
def test_scores_aggregate_salience_as_llm_pruner(importance):
    """An MLP channel's score is the sum over gate row, up row and down column of |w*g| summed (element-wise) or
    |sum of w*g| (vector-wise); a key/value group's adds its k, v rows and its query heads' q rows and o columns."""
    model = tiny_model("llama", heads=4, kv_heads=2, intermediate=64)
    gen = torch.Generator().manual_seed(0)
    grads = {p: torch.randn(p.shape, generator=gen) for p in model.parameters()}
    scores = structure_scores(model, grads, importance=importance)
    layer = model.model.layers[3]
    m, a = layer.mlp, layer.self_attn

    def s(lin, rows=None, cols=None):
        x = lin.weight.detach() * grads[lin.weight]
        x = x[rows] if rows is not None else x[:, cols]
        return x.abs().sum() if importance == "element1" else x.sum(dim=1 if rows is not None else 0).abs().sum()

    c = 5
    expect = s(m.gate_proj, rows=[c]) + s(m.up_proj, rows=[c]) + s(m.down_proj, cols=[c])
    torch.testing.assert_close(scores[3].mlp[c].float(), expect)
    # group 1 = key/value head 1 with query heads 2 and 3 (head_dim 16)
    q_rows, kv_rows = list(range(32, 64)), list(range(16, 32))
    expect = s(a.q_proj, rows=q_rows) + s(a.k_proj, rows=kv_rows) + s(a.v_proj, rows=kv_rows) + s(a.o_proj, cols=q_rows)
    torch.testing.assert_close(scores[3].groups[1].float(), expect)
    expect = s(a.q_proj, rows=list(range(48, 64))) + s(a.o_proj, cols=list(range(48, 64)))
    torch.testing.assert_close(scores[3].heads[1, 1].float(), expect)


def test_second_order_and_mixed_importance_run():
    for importance in ("element2", "mix"):
        model = tiny_model("qwen3", intermediate=128)
        report = prune_width(model, _windows(), 0.2, importance=importance, reduction="max", round_to=8,
                             progress=False)
        assert report["importance"] == importance and report["after"]["params"] < report["before"]["params"]


def test_mlp_only_keeps_every_head():
    model = tiny_model("mistral", intermediate=128)
    report = prune_width(model, _windows(), 0.2, round_to=8, attention=False, progress=False)
    assert report["after"]["num_attention_heads"] == 4 and report["after"]["num_key_value_heads"] == 2
    assert report["after"]["intermediate_size"] < 128


@pytest.mark.parametrize("ratio, message", [(0.99, "is too large"), (1e-5, "is too small"), (0.0, "must be in (0, 1)")])
def test_unreachable_ratio_is_refused_before_any_gradient(monkeypatch, ratio, message):
    import slimlm.compress.width as width

    def no_gradients(*args, **kwargs):
        raise AssertionError("gradients computed for a ratio that cannot be reached")

    monkeypatch.setattr(width, "taylor_gradients", no_gradients)
    model = tiny_model("llama", intermediate=128)
    with pytest.raises(SlimlmError) as err:
        prune_width(model, _windows(), ratio)
    assert message in str(err.value)
    with pytest.raises(SlimlmError) as err:
        plan_width(model, [], ratio)
    assert message in str(err.value)


def test_apply_width_refuses_uneven_plans():
    model = tiny_model("llama", intermediate=64)
    plan = [{"mlp_channels_removed": list(range(i + 1)), "kv_heads_removed": [], "q_heads_removed": []}
            for i in range(6)]
    with pytest.raises(ValueError, match="same MLP width"):
        apply_width(model, plan)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "width", "--width-ratio", "1.5"], "--width-ratio must be in (0, 1), got 1.5"),
        (["--method", "width", "--width-ratio", "0"], "--width-ratio must be in (0, 1), got 0.0"),
        (["--layers", "2", "--width-ratio", "-0.1"], "--width-ratio must be in (0, 1)"),
        (["--method", "width"], "--method width needs --width-ratio"),
        (["--method", "width", "--layers", "2", "--width-ratio", "0.2"], "--method width removes no layers"),
        (["--method", "width", "--width-ratio", "0.97"], "is too large"),
    ],
)
def test_cli_bad_width_ratio_is_one_line_and_exit_2(tiny_dir, calib_file, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["compress", str(tiny_dir), "-o", str(out), "--calib", str(calib_file), "--calib-samples", "4",
                 "--seq-len", "16", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag, heads", [([], False), (["--width-heads"], True)])
def test_cli_prunes_mlp_channels_only_unless_asked_for_heads(tiny_dir, calib_file, tmp_path, monkeypatch, flag,
                                                             heads):
    import slimlm.compress.width as width

    seen = {}
    real = width.prune_width

    def spy(*args, **kw):
        seen["attention"] = kw.get("attention")
        return real(*args, **kw)

    monkeypatch.setattr(width, "prune_width", spy)
    out = tmp_path / "out"
    code = main(["compress", str(tiny_dir), "-o", str(out), "--calib", str(calib_file), "--calib-samples", "4",
                 "--seq-len", "16", "--quiet", "--method", "width", "--width-ratio", "0.2", "--recover-minutes", "0",
                 *flag])
    assert code == 0 and seen["attention"] is heads
    config = json.loads((out / "config.json").read_text())
    if not heads:
        assert config["num_attention_heads"] == tiny_model("llama").config.num_attention_heads
    assert config["intermediate_size"] < tiny_model("llama").config.intermediate_size
