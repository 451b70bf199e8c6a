"""Compression on tiny random models: selection, surgery, training, the saved directory."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimlm
from slimlm.compress import CompressConfig
from slimlm.compress.select import block_influence, choose_block, choose_shortgpt
from slimlm.errors import SlimlmError
from slimlm.families import FAMILIES
from slimlm.models import FFNLayer, load_model

SMALL = dict(calib_samples=8, seq_len=32, heldout=2, epochs=3, progress=False, batch_size=64)


@pytest.fixture(autouse=True)
def _calib(calib_file):
    SMALL["calib"] = str(calib_file)


def _compress(tiny_dir, **kw):
    model, tok = load_model(str(tiny_dir))
    return slimlm.compress(model, CompressConfig(**{**SMALL, **kw}), tokenizer=tok)


@pytest.mark.parametrize("choice", ["loss", "cosine"])
def test_streamline_picks_planted_block(tiny_dir, choice):
    result = _compress(tiny_dir, layers=2, replacement="none", block_choice=choice)
    sel = result.report["selection"]
    assert sel["removed_layers"] == [2, 3] and sel["block_choice"] == choice
    assert result.report["layers_after"] == 4
    assert sel["cosine_choice"] == 2
    if choice == "loss":  # one KL per start; start 0 is never a candidate; the planted block costs least
        kl = sel["block_kl"]
        assert len(kl) == 6 - 2 + 1 and kl[0] is None
        assert kl[2] == min(kl[1:]) and all(v >= 0 for v in kl[1:])
        assert kl[2] < 0.1 * min(v for j, v in enumerate(kl[1:], 1) if j != 2)
    else:
        assert "block_kl" not in sel


def test_removal_losses_are_the_kl_of_the_model_with_the_block_removed(tiny_dir, monkeypatch):
    """The cached-prefix scoring gives the KL of the model with those layers really removed, the last block too."""
    import copy

    import slimlm.compress.select as select
    from slimlm.compress.recover import kd_terms
    from slimlm.compress.select import choose_by_loss, removal_losses
    from slimlm.surgery import replace_layers

    monkeypatch.setattr(select, "fast_autocast", lambda m: torch.autocast("cpu", enabled=False))  # float32 both ways
    model, _ = load_model(str(tiny_dir))
    windows = torch.randint(3, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    kl = removal_losses(model, windows, 2, progress=False, topk=320, stride=1)  # k = V: the exact KL
    strided = removal_losses(model, windows, 2, progress=False, topk=320, stride=4)
    with torch.no_grad():
        top = torch.log_softmax(model(windows).logits.float(), -1).reshape(-1, 320).topk(320, -1)
    for start in (3, 4):  # 4: the block ends the stack
        cut = copy.deepcopy(model)
        replace_layers(cut, [start, start + 1])
        with torch.no_grad():
            terms = kd_terms(cut(windows).logits.reshape(-1, 320), top.indices, top.values).view(3, 16)
        assert math.isclose(kl[start], float(terms.mean()), rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(strided[start], float(terms[:, ::4].mean()), rel_tol=1e-3, abs_tol=1e-6)
    assert choose_by_loss([None, 0.5, 0.2, float("nan"), 0.3]) == 2
    with pytest.raises(SlimlmError, match="no block"):
        choose_by_loss([None, float("nan")])


def test_block_choice_is_validated():
    with pytest.raises(SlimlmError, match="block choice"):
        CompressConfig(layers=2, block_choice="random")


def test_shortgpt_picks_lowest_block_influence(tiny_dir):
    result = _compress(tiny_dir, layers=2, method="shortgpt")
    bi = result.report["selection"]["block_influence"]
    removed = result.report["selection"]["removed_layers"]
    assert sorted(removed) == [2, 3]
    assert max(bi[i] for i in removed) <= min(bi[i] for i in range(1, len(bi)) if i not in removed)


def test_choose_block_never_starts_at_layer_zero():
    sim = torch.eye(5)
    sim[0, 2] = 0.99  # layers 0-1 look most redundant, but layer 0 is always kept
    sim[1, 3] = 0.5
    assert choose_block(sim, 2) == 1
    assert 0 not in choose_shortgpt(torch.eye(5) * 0 + 1, 2)
    assert len(block_influence(sim)) == 4


@pytest.mark.parametrize("replacement", ["ffn", "layer", "linear", "none"])
def test_saved_dir_round_trips_through_plain_transformers(tiny_dir, tmp_path, replacement):
    result = _compress(tiny_dir, layers=2, replacement=replacement)
    out = result.save(tmp_path / "out")
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(str(out))
    with torch.no_grad():
        a, b, c = plain(ids).logits, ours(ids).logits, result.model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
    has_ffn = any(isinstance(layer, FFNLayer) for layer in ours.model.layers)
    assert has_ffn == (replacement == "ffn")
    expected_layers = {"ffn": 5, "layer": 5, "linear": 4, "none": 4}[replacement]
    assert len(plain.model.layers) == expected_layers == ours.config.num_hidden_layers
    report = json.loads((out / "slimlm.json").read_text())
    assert report["config"]["replacement"] == replacement
    assert (out / "layer_scores.png").stat().st_size > 1000
    trained = replacement in ("ffn", "layer") or "recover" in report["training"]
    assert (out / "loss_curve.png").exists() == trained
    # greedy generation with a KV cache agrees between the two loaders
    prompt = ids[:1, :5]
    g1 = plain.generate(prompt, max_new_tokens=8, do_sample=False)
    g2 = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(g1, g2)


def test_config_reads_the_same_under_transformers_4(tiny_dir, tmp_path):
    out = _compress(tiny_dir, layers=1, replacement="none").save(tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 5


@pytest.mark.parametrize("replacement", ["ffn", "layer"])
def test_training_lowers_validation_mse(tmp_path_factory, replacement):
    from slimlm.testing import save_tiny

    plain_dir = save_tiny(tmp_path_factory.mktemp("plain") / "m", seed=3)  # no planted block: real work to learn
    result = _compress(plain_dir, layers=2, replacement=replacement, epochs=4, lr=3e-3, calib_samples=16)
    hist = result.report["training"]["mse"]["history"]
    assert len(hist) == 5
    assert result.report["training"]["mse"]["best_val_mse"] < hist[0]["val_mse"]
    lrs = [h["lr"] for h in hist[1:]]
    assert lrs[-1] < max(lrs)  # the cosine schedule really decays


def test_lm_stage_runs_and_keeps_best(tiny_dir):
    result = _compress(tiny_dir, layers=2, replacement="ffn", train_loss="lm", lm_epochs=2)
    lm = result.report["training"]["lm"]
    val = [row["val_ce"] for row in lm["history"]]
    assert lm["best_val_ce"] == min(val)  # the best epoch is the one kept
    assert lm["best_val_ce"] < val[0]  # and training improved on the replacement it started from


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3"])
def test_tail_layers_forward_equals_the_full_model(tmp_path, family):
    """Feeding the hidden state entering layer j to the model cut down to layers[j:] gives its logits."""
    from slimlm.compress.select import collect_block_io
    from slimlm.models import tail_layers
    from slimlm.testing import save_tiny

    model, _ = load_model(str(save_tiny(tmp_path / family, family=family)))
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids, use_cache=False).logits
    x = collect_block_io(model, ids, 2, 3, progress=False, dtype=torch.float32)["x"]
    with tail_layers(model, 2):
        tail = model(inputs_embeds=x, use_cache=False).logits
    torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-4)
    assert len(model.model.layers) == model.config.num_hidden_layers  # restored


def test_kd_loss_is_cross_entropy_against_teacher_top_k():
    from slimlm.compress.replace import kd_loss

    logits = torch.randn(3, 5, 11)
    top = torch.log_softmax(logits, -1).topk(11, -1)  # k = V: exact cross-entropy = entropy of itself
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(logits, top.indices, top.values), entropy)
    other = torch.randn(3, 5, 11)
    assert kd_loss(other, top.indices, top.values) > entropy  # Gibbs: any other student costs more


def test_kd_stage_lowers_distillation_loss(tmp_path_factory):
    from slimlm.testing import save_tiny

    plain_dir = save_tiny(tmp_path_factory.mktemp("plain") / "m", seed=3)
    result = _compress(plain_dir, layers=2, replacement="ffn", epochs=1, train_loss="kd", kd_epochs=3,
                       kd_lr=3e-3, kd_topk=8, kd_batch_tokens=64, calib_samples=16)
    kd = result.report["training"]["kd"]
    assert len(kd["history"]) == 4 and kd["topk"] == 8
    assert kd["best_val_kd"] < kd["history"][0]["val_kd"]
    assert result.report["training"]["mse"]["history"]  # distillation starts from the MSE fit


def test_linear_fold_matches_least_squares_map(tiny_dir):
    """The folded model's hidden state leaving layer j-1 equals X + M T, with T the solved map."""
    from slimlm.compress.replace import fold_linear, solve_linear
    from slimlm.compress.select import collect_block_io

    model, _ = load_model(str(tiny_dir))
    windows = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    io = collect_block_io(model, windows, 2, 4, keep_mlp_before=True, progress=False, dtype=torch.float32)
    t, info = solve_linear(io["mlp"], io["x"], io["y"])
    assert 0 <= info["relative_residual"] < 1
    fold_linear(model, 1, t)
    io2 = collect_block_io(model, windows, 2, 3, progress=False, dtype=torch.float32)
    expected = io["x"] + io["mlp"] @ t.float()
    torch.testing.assert_close(io2["x"], expected, rtol=1e-4, atol=1e-4)


def test_heldout_quality_is_reported(tiny_dir):
    q = _compress(tiny_dir, layers=2, replacement="none").report["quality"]
    assert q["heldout_windows"] == 2
    assert q["ppl_dense"] > 0 and q["ppl_compressed"] > 0 and 0 <= q["top1_agreement"] <= 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_compresses_and_round_trips(tmp_path, family):
    from slimlm.testing import save_tiny

    src = save_tiny(tmp_path / family, family=family, plant_redundant=(2, 2))
    model, tok = load_model(str(src))
    result = slimlm.compress(model, CompressConfig(layers=2, **SMALL), tokenizer=tok)
    assert result.report["selection"]["removed_layers"] == [2, 3]
    out = result.save(tmp_path / "out")
    ids = torch.randint(3, 320, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_ratio_rounds_to_layers(tiny_dir):
    assert CompressConfig(ratio=0.34).n_remove(6) == 2
    with pytest.raises(slimlm.errors.SlimlmError):
        CompressConfig(layers=6).n_remove(6)


def test_self_calibration_is_seeded_and_shaped(tiny_dir):
    from slimlm.data import self_generate

    model, tok = load_model(str(tiny_dir))
    a = self_generate(model, tok, 3, 24, seed=5, batch_size=4, progress=False)
    b = self_generate(model, tok, 3, 24, seed=5, batch_size=4, progress=False)
    c = self_generate(model, tok, 3, 24, seed=6, batch_size=4, progress=False)
    assert a.shape == (3, 24) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tok.decode(a[0]).startswith("<|im_start|>user")  # the instruction in the chat template comes first


def test_loop_start_finds_where_a_sample_starts_to_repeat():
    from slimlm.data import loop_start

    prose = list(range(100))
    assert loop_start(prose) is None
    assert loop_start(prose[:30] + prose[10:25], n=10) == 30  # a 15-token stretch written again: cut where it restarts
    assert loop_start(prose[:30] + prose[10:19], n=10) is None  # 9 tokens again: not a loop at n=10
    assert loop_start([7, 8] + [5] * 20, n=4) == 3  # "the the the": cut after its first run of 4 began
    assert loop_start([1, 2, 3], n=10) is None


def test_generation_ends_a_row_where_it_starts_to_loop(tiny_dir):
    """generate_batch(loop_ngram=n) gives each row the greedy text cut where `loop_start` cuts the whole text, and
    says which rows ended so."""
    from slimlm.data import loop_start
    from slimlm.generate import generate_batch

    model, _ = load_model(str(tiny_dir))
    model.eval()
    cut_any = False
    for prompt in ([5, 17, 42], [11, 250, 31, 9], [7]):
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        full = generate_batch(model, ids, mask, 48)[0].tolist()
        looped: list[bool] = []
        short = generate_batch(model, ids, mask, 48, loop_ngram=4, looped=looped)[0].tolist()
        at = loop_start(full, n=4)
        assert looped == [at is not None]
        assert short == (full if at is None else full[:at])
        assert loop_start(short, n=4) is None
        cut_any |= at is not None
    assert cut_any  # a random tiny model loops under greedy decoding: the cut was exercised


def test_self_calibration_counts_loops_and_takes_plain_text_for_a_base_model(tiny_dir, monkeypatch):
    """self_generate asks generation to end loops and counts the samples it cut; a tokenizer without a chat
    template (a base model) gets plain-text openings only."""
    import slimlm.data as data

    model, tok = load_model(str(tiny_dir))
    asked = []

    def looping(model, ids, mask, max_new, **kw):  # every row: 12 tokens, then ended at a loop
        asked.append(kw["loop_ngram"])
        kw["looped"][:] = [True] * ids.shape[0]
        return [torch.tensor(list(range(100, 112))) for _ in range(ids.shape[0])]

    monkeypatch.setattr(data, "generate_batch", looping)
    stats: dict = {}
    windows = data.self_generate(model, tok, 4, 64, seed=0, batch_size=4, progress=False, stats=stats)
    assert windows.shape == (4, 64) and set(asked) == {data.LOOP_NGRAM}
    assert stats["samples"] >= 4 and stats["looping_samples"] == stats["samples"] and stats["plain_frac"] == 0.5
    assert stats["free_frac"] == 0.0  # no BOS: no document can begin with nothing
    tok.chat_template = None
    tok.add_bos_token = True  # a base model whose texts begin with BOS (Gemma): every prompt after it
    base: dict = {}
    starts, lengths = [], []

    def first_tokens(model, ids, mask, max_new, **kw):
        starts.extend(int(row[m.bool()][0]) for row, m in zip(ids, mask))
        lengths.extend(int(m.sum()) for m in mask)
        return looping(model, ids, mask, max_new, **kw)

    monkeypatch.setattr(data, "generate_batch", first_tokens)
    data.self_generate(model, tok, 2, 64, seed=0, batch_size=4, progress=False, stats=base)
    assert base["plain_frac"] == 1.0 and starts and set(starts) == {tok.bos_token_id}
    # with a BOS, a share of the documents begins with it alone: the model picks what to write
    assert base["free_frac"] == data.SELF_FREE_FRAC > 0
    assert lengths.count(1) == round(len(lengths) * data.SELF_FREE_FRAC) and max(lengths) > 1


def test_self_prompts_alternate_chat_instructions_and_plain_openings():
    from slimlm.data import OPENINGS, self_prompts

    prompts = self_prompts(10, seed=1)
    assert [chat for _, chat in prompts] == [True, False] * 5
    assert prompts == self_prompts(10, seed=1) and prompts != self_prompts(10, seed=2)
    plain = [text for text, chat in prompts if not chat]
    heads = [o.split("{")[0] for o in OPENINGS]
    assert all(any(text.startswith(h) for h in heads) and "{" not in text for text in plain)
    assert len(set(text for text, _ in self_prompts(200, seed=0))) == 200  # no repeats within 512 pairs


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.75, 1.0])
def test_self_prompts_share_of_plain_openings(frac):
    from slimlm.data import self_prompts

    prompts = self_prompts(40, seed=0, plain_frac=frac)
    kinds = [chat for _, chat in prompts]
    assert len(prompts) == 40 and kinds.count(False) == round(40 * frac)
    for i in range(4, 41, 4):  # spread evenly, not bunched at either end
        assert abs(kinds[:i].count(False) - i * frac) <= 1
    # the instructions and the openings come in one seeded order each, whatever the mix
    chat, plain = [p for p in prompts if p[1]], [p for p in prompts if not p[1]]
    assert chat == self_prompts(40, seed=0, plain_frac=0.0)[:len(chat)]
    assert plain == self_prompts(40, seed=0, plain_frac=1.0)[:len(plain)]


def test_self_prompts_reject_a_share_outside_0_1():
    from slimlm.data import self_prompts
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="plain_frac"):
        self_prompts(4, seed=0, plain_frac=1.5)
    with pytest.raises(SlimlmError, match="free_frac"):
        self_prompts(4, seed=0, free_frac=-0.1)


@pytest.mark.parametrize("free", [0.25, 0.5, 1.0])
def test_self_prompts_share_of_documents_begun_from_nothing(free):
    from slimlm.data import self_prompts

    prompts = self_prompts(40, seed=0, plain_frac=0.5, free_frac=free)
    plain = [text for text, chat in prompts if not chat]
    assert [chat for _, chat in prompts] == [p[1] for p in self_prompts(40, seed=0, plain_frac=0.5)]
    assert plain.count("") == round(len(plain) * free)
    for i in range(4, len(plain) + 1, 4):  # spread evenly among the openings
        assert abs(plain[:i].count("") - i * free) <= 1
    # the openings that remain come in their own order, none dropped in between
    openings = [t for t in plain if t]
    assert openings == [t for t, chat in self_prompts(80, seed=0, plain_frac=1.0)][:len(openings)]


def test_sampling_model_is_a_bfloat16_copy_only_where_it_pays(tiny_dir, monkeypatch):
    import slimlm.data as data

    model, _ = load_model(str(tiny_dir))
    monkeypatch.setattr(data, "_cpu_bf16_fast", lambda: True)
    copy = data.sampling_model(model)
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    monkeypatch.setattr(data, "_cpu_bf16_fast", lambda: False)
    assert data.sampling_model(model) is model


