"""Every family of the layout table through the stages after compression, on a tiny random model with an FFN slot
(the README's families x stages table; compression itself and width pruning per family are in
tests/compress/test_compress.py and tests/compress/test_width.py): ONNX export with its validation and the
onnxruntime-genai config, serving a chat completion on the PyTorch and the ONNX backends with the same greedy
text, GGUF where the export takes the family, and a template without a system role."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.families import FAMILIES

FAMS = sorted(FAMILIES)
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How do you boil water?"}]
# a chat template that refuses a system role, as Gemma 2's does
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """family -> a saved tiny model (6 layers) whose layers 2-3 are one FFN slot (built, not trained)."""
    from slimlm.compress.replace import new_ffn_slot
    from slimlm.models import replace_layers, save_model
    from slimlm.testing import tiny_model, tiny_tokenizer

    made = {}

    def make(family):
        if family not in made:
            model = tiny_model(family, layers=6)
            replace_layers(model, [2, 3], replacement=new_ffn_slot(model, 2))
            tok = tiny_tokenizer()
            if family.startswith("gemma"):
                tok.chat_template = NO_SYSTEM_TEMPLATE
            # named as the family: llama.cpp treats a model named Phi-3 specially
            made[family] = save_model(model, tok, tmp_path_factory.mktemp(family) / family, {})
        return made[family]

    return make


@pytest.fixture(scope="module")
def exported(compressed, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slimlm.export import OnnxConfig, export_onnx

    made = {}

    def make(family):
        if family not in made:
            out = tmp_path_factory.mktemp(family + "-onnx") / "onnx"
            made[family] = (out, export_onnx(str(compressed(family)), out, OnnxConfig(weights="fp32"))["onnx"])
        return made[family]

    return make


@pytest.mark.parametrize("family", FAMS)
def test_onnx_export_validates(family, exported):
    out, info = exported(family)
    check = info["validation"]
    assert check["passed"] and check["greedy_match"], check["failures"]
    # 16 validation tokens after a past of 32 cross the tiny model's sliding window of 8 (Gemma)
    assert max(c["past_len"] + c["tokens"] for c in check["checks"]) > 8
    assert len(info["kv_layers"]) == 4  # the FFN slot has no cache
    fused = FAMILIES[family].pre_norm_only
    assert info["attention"] == ("fused" if fused else "plain")
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == ("gemma3_text" if family == "gemma3_text" else family)
    assert genai["model"]["decoder"]["num_hidden_layers"] == 4


@pytest.mark.parametrize("family", FAMS)
def test_serve_chat_on_torch_and_onnx_backends(family, compressed, exported):
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    req = {"model": "tiny", "messages": CHAT, "max_tokens": 10, "temperature": 0}
    texts = {}
    for backend, model in (("torch", compressed(family)), ("onnx", exported(family)[0])):
        cfg = ServeConfig(model=str(model), backend=backend, served_model_name="tiny", threads=1, max_model_len=128)
        served, tok = load_backend(cfg)
        with TestClient(create_app(cfg, backend=served, tokenizer=tok)) as client:
            r = client.post("/v1/chat/completions", json=req)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] > 0
            texts[backend] = body["choices"][0]["message"]["content"]
            # the prompt the server built: with a template that refuses a system role (the tiny Gemmas'), the
            # system text rides in the first user turn
            from slimlm.serve.chat import fold_system

            sent = fold_system(CHAT) if family.startswith("gemma") else CHAT
            want = tok.encode(tok.apply_chat_template(sent, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
            assert client.post("/tokenize", json={"messages": CHAT}).json()["tokens"] == want
    assert texts["torch"] == texts["onnx"]


def test_a_template_without_system_role_gets_the_system_text_in_the_first_user_turn():
    from slimlm.serve.chat import fold_system

    assert fold_system(CHAT) == [{"role": "user", "content": "Answer briefly.\n\nHow do you boil water?"}]
    assert fold_system(CHAT[1:]) is None  # nothing to fold
    assert fold_system(CHAT[:1]) is None  # no user turn to carry it
    two = [CHAT[0], {"role": "system", "content": "Be kind."}, *CHAT[1:],
           {"role": "assistant", "content": "Heat it."}]
    assert fold_system(two)[0]["content"] == "Answer briefly.\n\nBe kind.\n\nHow do you boil water?"
    assert [m["role"] for m in fold_system(two)] == ["user", "assistant"]


def test_a_system_message_the_template_cannot_carry_is_a_400(compressed):
    """A system message after the first user turn has no user turn to ride in: the template's refusal is a 400."""
    from fastapi.testclient import TestClient

    from slimlm.serve.app import create_app
    from slimlm.serve.backends import load_backend
    from slimlm.serve.config import ServeConfig

    cfg = ServeConfig(model=str(compressed("gemma3_text")), backend="torch", served_model_name="tiny", threads=1,
                      max_model_len=128)
    served, tok = load_backend(cfg)
    late = [*CHAT[1:], {"role": "assistant", "content": "Heat it."}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "And then?"}]
    with TestClient(create_app(cfg, backend=served, tokenizer=tok)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": late, "max_tokens": 4})
        assert r.status_code == 400
        assert "System role not supported" in r.json()["error"]["message"]


def test_a_family_outside_the_table_is_one_line():
    from slimlm.families import family_of

    class Config:
        model_type = "gpt2"

    class Model:
        config = Config()

    with pytest.raises(Exception) as err:
        family_of(Model())
    message = str(err.value)
    assert "unsupported architecture 'gpt2'" in message and "gemma3_text" in message and "\n" not in message


@pytest.mark.parametrize("family", FAMS)
def test_plain_transformers_generates_what_slimlm_loads(family, compressed):
    """OUT in plain transformers (no remote code) and through slimlm's loader (FFN slot lean again): same logits."""
    from transformers import AutoModelForCausalLM

    from slimlm.models import FFNLayer, decoder_layers, load_model

    out = compressed(family)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(str(out))
    assert isinstance(decoder_layers(ours)[2], FFNLayer)
    ids = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    types = getattr(plain.config, "layer_types", None)
    assert types == json.loads((out / "config.json").read_text()).get("layer_types")
    if family.startswith("gemma"):  # S S G S S G with layers 2-3 one slot: the layers kept keep their types
        assert types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"]


@pytest.mark.parametrize("family", FAMS)
def test_gguf_export(family, compressed, tmp_path):
    """The family's llama.cpp architecture, its metadata, and (where llama-cpp-python is installed) llama.cpp's
    greedy tokens equal PyTorch's on the f32 file; without it, the file's layout is checked as written."""
    import gguf

    from slimlm.export.gguf import GgufConfig, export_gguf
    from slimlm.export.gguf_check import llama_cpp_available

    out = tmp_path / "m.gguf"
    check = llama_cpp_available()
    info = export_gguf(str(compressed(family)), out, GgufConfig(type="f32", validate=check, modelfile=False))["gguf"]
    arch = FAMILIES[family].gguf_arch
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 5
    names = {t.name for t in reader.tensors}
    if family == "phi3":
        assert "blk.0.attn_qkv.weight" in names and "blk.0.ffn_gate.weight" not in names
    if family.startswith("gemma"):
        assert fields[f"{arch}.attention.sliding_window"] == 8
        assert fields[f"{arch}.attention.sliding_window_pattern"] == [True, True, False, True, False]
        assert "blk.0.post_ffw_norm.weight" in names
        norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(compressed(family))
        stored = torch.from_numpy(norm.data.copy()).float()
        torch.testing.assert_close(stored, plain.model.layers[0].input_layernorm.weight.detach() + 1)
    if check:
        v = info["validation"]
        assert v["passed"] and v["greedy_match"] and v["tokenizer_match"], v


@pytest.mark.parametrize("family", FAMS)
def test_bitsandbytes_int8_keeps_the_slot_lean(family, compressed, tmp_path):
    pytest.importorskip("bitsandbytes")
    import slimlm
    from slimlm.export.bnb import QuantConfig, quantize, quiet_bnb
    from slimlm.models import FFNLayer, decoder_layers

    ref, _ = slimlm.load_model(str(compressed(family)))
    quantize(str(compressed(family)), tmp_path / "q", QuantConfig(method="int8"))
    model, _ = slimlm.load_model(str(tmp_path / "q"))
    assert isinstance(decoder_layers(model)[2], FFNLayer)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), quiet_bnb():
        a, b = model(ids).logits.float().flatten(), ref(ids).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99


def _genai_python():
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("onnxruntime_genai") is not None:
        return sys.executable
    return os.environ.get("SLIMLM_GENAI_PYTHON")


GENAI_GREEDY = (
    "import json, sys, onnxruntime_genai as og; m = og.Model(sys.argv[1]); "
    "p = og.GeneratorParams(m); p.set_search_options(max_length=len(json.loads(sys.argv[2])) + 20, "
    "do_sample=False); g = og.Generator(m, p); g.append_tokens(json.loads(sys.argv[2])); out = []\n"
    "while not g.is_done():\n    g.generate_next_token(); out.append(int(g.get_next_tokens()[0]))\n"
    "print(json.dumps(out))")


@pytest.mark.skipif(_genai_python() is None, reason="onnxruntime-genai (here or in SLIMLM_GENAI_PYTHON)")
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_onnxruntime_genai_runs_the_family_export(family, exported):
    """og.Generator on the export folder as written: OnnxCausalLM's greedy tokens, past the sliding window."""
    import subprocess

    from slimlm.export.runtime import OnnxCausalLM

    out = exported(family)[0]
    prompt = [5, 17, 42, 99, 7]
    res = subprocess.run([_genai_python(), "-c", GENAI_GREEDY, str(out), json.dumps(prompt)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    lm = OnnxCausalLM(out, threads=1)
    want = lm.generate(prompt, 20, stop_at_eos=False)
    n = next((i + 1 for i, t in enumerate(want) if t in lm.eos_token_ids), len(want))  # genai stops at the end
    assert got == want[:n] and len(got) + len(prompt) > 8


@pytest.mark.skipif(not __import__("os").environ.get("SLIMLM_TF4_PYTHON"),
                    reason="SLIMLM_TF4_PYTHON (a transformers 4.x Python)")
@pytest.mark.parametrize("family", FAMS)
def test_transformers_4x_loads_the_compressed_family(family, compressed):
    """OUT of every family under transformers 4.x (what Optimum-ONNX and many deployments pin): the same
    tokens and the same logits as under 5.x."""
    import os
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = compressed(family)
    text = "How do you boil water? 12 eggs."
    code = ("import json, sys, torch, transformers; from transformers import AutoTokenizer, AutoModelForCausalLM; "
            f"t = AutoTokenizer.from_pretrained({str(out)!r}); m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
            f"ids = t({text!r})['input_ids']; "
            "print(json.dumps({'v': transformers.__version__, 'ids': ids, "
            "'logits': m(torch.tensor([ids])).logits[0].tolist()}))")
    res = subprocess.run([os.environ["SLIMLM_TF4_PYTHON"], "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["v"].startswith("4.") and got["ids"] == AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor([got["ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), ref, atol=1e-5, rtol=1e-5)


def test_a_multimodal_gemma3_checkpoint_compresses_as_its_text_model(tmp_path, calib_file, capsys):
    """A `Gemma3ForConditionalGeneration` directory loads as its text decoder (same logits, shared weights) and
    `slimlm compress` writes a text-only OUT that plain transformers loads as `Gemma3ForCausalLM`."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    from slimlm.cli import main
    from slimlm.models import FFNLayer, decoder_layers, load_model
    from slimlm.testing import save_tiny_multimodal

    src = save_tiny_multimodal(tmp_path / "mm")
    full = Gemma3ForConditionalGeneration.from_pretrained(src).eval()
    text, _ = load_model(str(src))
    assert type(text).__name__ == "Gemma3ForCausalLM" and text.config.model_type == "gemma3_text"
    assert not any("vision" in name for name, _ in text.named_parameters())
    ids = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(text(ids).logits, full(ids).logits, rtol=0, atol=0)

    out = tmp_path / "out"
    code = main(["compress", str(src), "-o", str(out), "--layers", "2", "--calib", str(calib_file), "--calib-samples",
                 "4", "--seq-len", "16", "--epochs", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(str(out))
    assert len(decoder_layers(ours)) == 5 and any(isinstance(layer, FFNLayer) for layer in decoder_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
