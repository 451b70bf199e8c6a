"""Requests real clients and hostile ones send that once got a 500 or an unreadable answer: deeply nested JSON,
chat templates that refuse a conversation, non-finite sampling numbers, pydantic's union tags in messages, and
a huge prompt tokenized on the event loop."""

from __future__ import annotations

import pytest

JSON = {"content-type": "application/json"}
CHAT = [{"role": "user", "content": "How do you boil water?"}]


def assert_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


@pytest.mark.parametrize("depth", [900, 5000, 100_000])
def test_deeply_nested_json_is_a_400(client, depth):
    body = '{"prompt": "x", "max_tokens": 1, "extra": ' + "[" * depth + "]" * depth + "}"
    r = client.post("/v1/completions", content=body, headers=JSON)
    if r.status_code == 200:  # shallow enough to parse: the unknown field is ignored
        return
    assert "nested too deeply" in assert_error(r, 400)["message"]


def test_chat_template_that_refuses_the_messages_is_a_400(backend, tiny):
    import copy

    from fastapi.testclient import TestClient
    from slimlm.serve.app import create_app
    from slimlm.serve.config import ServeConfig

    tok = copy.deepcopy(tiny[1])  # like Gemma's or Mistral's templates, which raise on a role they do not know
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "<|im_start|>assistant\n")
    app = create_app(ServeConfig(model="tiny", served_model_name="tiny"), backend=backend, tokenizer=tok)
    with TestClient(app) as client:
        system = [{"role": "system", "content": "Be brief."}, *CHAT]
        err = assert_error(client.post("/v1/chat/completions", json={"messages": system, "max_tokens": 2}), 400,
                           "messages")
        assert "System role not supported" in err["message"]
        assert_error(client.post("/tokenize", json={"messages": system}), 400, "messages")
        assert client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).status_code == 200
