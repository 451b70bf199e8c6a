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
