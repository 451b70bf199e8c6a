"""Whole-model recovery on tiny random models: the loss, its chunking, on-policy text, and what it buys."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimlm
from slimlm.compress import CompressConfig
from slimlm.compress.recover import chunked_kd, kd_terms, student_samples, trainable_params
from slimlm.models import load_model
from slimlm.testing import save_tiny

BASE = dict(calib_samples=16, seq_len=32, heldout=2, epochs=2, progress=False, batch_size=64, kd_topk=16,
            kd_batch_tokens=128, kd_epochs=1)


def test_kd_terms_is_the_kl_over_top_k_plus_one_rest_bucket():
    teacher, student = torch.randn(6, 11), torch.randn(6, 11)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    full = torch.log_softmax(teacher, -1).topk(11, -1)  # k = V: the exact KL
    exact = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kd_terms(student, full.indices, full.values), exact, rtol=1e-5, atol=1e-6)
    top = torch.log_softmax(teacher, -1).topk(4, -1)  # k < V: the k tokens and the rest as one outcome
    pk, qk = p.gather(-1, top.indices), q.gather(-1, top.indices)
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    bucket = (pk * (pk.log() - qk.log())).sum(-1) + pr * (pr.log() - qr.log())
    torch.testing.assert_close(kd_terms(student, top.indices, top.values), bucket, rtol=1e-4, atol=1e-6)
    assert float(kd_terms(teacher, top.indices, top.values).abs().max()) < 1e-5  # the teacher itself: 0


def test_chunked_loss_and_gradient_equal_the_unchunked_ones(monkeypatch, tmp_path):
    import slimlm.compress.recover as rec

    model, _ = load_model(str(save_tiny(tmp_path / "m", seed=1)))
    teacher, _ = load_model(str(save_tiny(tmp_path / "t", seed=2)))
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = torch.log_softmax(teacher(ids).logits, -1).topk(8, -1)
    monkeypatch.setattr(rec, "fast_autocast", lambda m: torch.autocast("cpu", enabled=False))
    grads = []
    losses = []
    for rows in (1000, 7):  # one chunk, then many uneven ones
        monkeypatch.setattr(rec, "LOGIT_ROWS", rows)
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        losses.append(chunked_kd(model, ids, top.indices, top.values.half(), backward=True))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    direct = kd_terms(model(ids).logits.reshape(-1, 320), top.indices.reshape(-1, 8),
                      top.values.half().reshape(-1, 8)).mean()
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    assert math.isclose(losses[0], float(direct.detach()), rel_tol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_embeddings_and_head_stay_frozen(tmp_path):
    model, _ = load_model(str(save_tiny(tmp_path / "m")))
    ids = {id(p) for p in trainable_params(model)}
    assert id(model.get_input_embeddings().weight) not in ids
    assert id(model.get_output_embeddings().weight) not in ids
    assert all(id(p) in ids for p in model.model.layers.parameters())
    assert id(model.model.norm.weight) in ids


def test_student_samples_are_chat_turns_packed_into_windows(tmp_path):
    model, tok = load_model(str(save_tiny(tmp_path / "m")))
    windows = student_samples(model, tok, 300, 32, seed=0, progress=False, max_new_tokens=24)
    assert windows.dim() == 2 and windows.shape[1] == 32 and windows.numel() >= 32
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert int((windows == start).sum()) >= 2  # prompts in the chat template: at least one turn per window


def _held_kl(teacher, model, ids):
    with torch.no_grad():
        top = torch.log_softmax(teacher(ids).logits, -1).topk(16, -1)
        return float(kd_terms(model(ids).logits.reshape(-1, 320), top.indices.reshape(-1, 16),
                              top.values.reshape(-1, 16)).mean())


def _peaky_tiny(path):
    """A tiny random model whose layers matter: larger residual updates and sharper next-token distributions
    than the plain random init (where removing two layers changes almost nothing)."""
    from slimlm.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model(seed=3), tiny_tokenizer()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(4)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(6)
            layer.mlp.down_proj.weight.mul_(6)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_recovery_lowers_kl_on_unseen_text_and_keeps_a_plain_model(tmp_path, calib_file):
    src = _peaky_tiny(tmp_path / "src")
    teacher, tok = load_model(str(src))
    text = calib_file.read_text()
    unseen = tok(text[len(text) // 2:], return_tensors="pt")["input_ids"][0][:8 * 32].view(8, 32)
    kls = {}
    for name, extra in (("off", dict(recover_minutes=0)),
                        ("on", dict(recover_steps=40, recover_lr=5e-4, recover_tokens=256))):
        model, tok = load_model(str(src))
        cfg = CompressConfig(layers=2, calib=str(calib_file), **{**BASE, "calib_samples": 64}, **extra)
        result = slimlm.compress(model, cfg, tokenizer=tok)
        kls[name] = _held_kl(teacher, result.model, unseen)
        if name == "on":
            rec = result.report["training"]["recover"]
            assert rec["steps"] == 40 and rec["onpolicy_tokens"] > 0 and rec["trained_params"] > 0
            assert [h["step"] for h in rec["history"]][0] == 0 and rec["history"][-1]["step"] == 40
            out = result.save(tmp_path / "out")
            plain = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                torch.testing.assert_close(plain(unseen).logits, result.model(unseen).logits, rtol=1e-5, atol=1e-5)
            assert (out / "loss_curve.png").is_file()
        else:
            assert "recover" not in result.report["training"]
    assert kls["on"] < 0.9 * kls["off"], kls  # measured: 0.0081 -> 0.0067


def test_a_learning_rate_that_hurts_is_backed_off(tmp_path, calib_file):
    """A rate far too high raises the held-out KL at the first evaluation: recovery goes back to the best weights at
    a quarter of the rate, and ends better than it began (keep-best alone would only have kept the start)."""
    src = _peaky_tiny(tmp_path / "src")
    model, tok = load_model(str(src))
    cfg = CompressConfig(layers=2, calib=str(calib_file), **{**BASE, "calib_samples": 64}, recover_steps=40,
                         recover_lr=3e-2, recover_tokens=0)
    rec = slimlm.compress(model, cfg, tokenizer=tok).report["training"]["recover"]
    hist = rec["history"]
    assert [h["step"] for h in hist] == [0, 10, 20, 30, 40]  # evaluated 4 times at least, not once an epoch
    assert rec["backoffs"] >= 1 and math.isclose(rec["final_lr"], 3e-2 * 0.25 ** rec["backoffs"])
    assert [h["backoff_lr"] for h in hist if "backoff_lr" in h][0] == pytest.approx(3e-2 * 0.25)
    assert rec["best_val_kl"] < hist[0]["val_kl"], hist


def test_recovery_trains_on_the_pruned_models_own_answers_too(tiny_dir, calib_file):
    model, tok = load_model(str(tiny_dir))
    cfg = CompressConfig(layers=2, calib=str(calib_file), **BASE, recover_steps=2, recover_tokens=200)
    rec = slimlm.compress(model, cfg, tokenizer=tok).report["training"]["recover"]
    assert rec["onpolicy_tokens"] >= 200 and rec["onpolicy_tokens"] % 32 == 0
    assert rec["train_windows"] == BASE["calib_samples"] + rec["onpolicy_tokens"] // 32  # held-out windows apart


def test_recovery_flags_are_validated():
    from slimlm.errors import SlimlmError

    for bad, message in ((dict(recover_minutes=-1), "--recover-minutes"), (dict(recover_lr=0), "--recover-lr"),
                         (dict(recover_steps=0), "--recover-steps"), (dict(recover_tokens=-5), "--recover-tokens")):
        with pytest.raises(SlimlmError, match=message):
            CompressConfig(layers=1, **bad)
    assert not CompressConfig(layers=1, recover_minutes=0).recovers
    assert CompressConfig(layers=1, recover_minutes=0, recover_steps=3).recovers


def test_initial_learning_rate_follows_the_weights_scale():
    """The default rate is RECOVER_LR_PER_RMS times the RMS of the matrices (vectors, such as norms, do not count):
    weights 10x smaller get a rate 10x smaller; all-zero weights get the fallback."""
    from slimlm.compress.recover import RECOVER_LR_FALLBACK, RECOVER_LR_PER_RMS, initial_lr

    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(64, 32) * 0.2), torch.nn.Parameter(torch.randn(16, 64) * 0.2)]
    norm = torch.nn.Parameter(torch.full((64,), 100.0))
    rms = math.sqrt(sum(float(p.pow(2).sum()) for p in mats) / sum(p.numel() for p in mats))
    assert initial_lr(mats + [norm]) == pytest.approx(RECOVER_LR_PER_RMS * rms)
    small = [torch.nn.Parameter(p.detach() * 0.1) for p in mats]
    assert initial_lr(small + [norm]) == pytest.approx(0.1 * initial_lr(mats))
    assert initial_lr([torch.nn.Parameter(torch.zeros(8, 8))]) == RECOVER_LR_FALLBACK


def test_recovery_records_the_rate_it_used(tiny_dir, calib_file):
    from slimlm.compress.recover import initial_lr, trainable_params

    for given in (None, 1e-3):
        model, tok = load_model(str(tiny_dir))
        expected = given or initial_lr(trainable_params(model))  # the layers kept train from their own weights
        cfg = CompressConfig(layers=2, calib=str(calib_file), **BASE, recover_steps=2, recover_tokens=0,
                             recover_lr=given)
        rec = slimlm.compress(model, cfg, tokenizer=tok).report["training"]["recover"]
        assert rec["lr_rule"] == ("given" if given else "0.0004 x weight RMS")
        assert rec["lr"] == pytest.approx(expected, rel=0.25 if given is None else 1e-9)
