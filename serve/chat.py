"""`POST /v1/chat/completions`: the chat prompt (the model's chat template), budget and response shapes.

The answer is `chat.completion` objects, or `chat.completion.chunk`s whose first chunk carries the assistant role,
with the chat `logprobs` block (content items with bytes and top_logprobs).
"""

from __future__ import annotations

import asyncio

from slimlm.serve.protocol import (
    ApiError,
    ChatRequest,
    chat_logprobs,
    chat_logprobs_block,
    chat_messages,
    sampling_params,
    stop_list,
)
from slimlm.serve.serving import Generation, OpenAIServing, StreamState


class ServingChat(OpenAIServing):
    id_prefix = "chatcmpl"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    async def prepare(self, req: ChatRequest) -> Generation:
        ids = await asyncio.to_thread(self.prompt_ids, req)  # a worker thread: see ServingCompletion.prepare
        params = sampling_params(req, chat_logprobs(req))
        wanted, param = req.max_completion_tokens, "max_completion_tokens"
        if wanted is None and req.max_tokens is not None:
            wanted, param = req.max_tokens, "max_tokens"
        max_tokens = self.budget(ids, wanted, None, param, "messages" if param == "max_completion_tokens" else "prompt")
        return Generation(req, ids, params, max_tokens, stop_list(req))

    def prompt_ids(self, req: ChatRequest) -> list[int]:
        """The conversation through the model's chat template, ending where the assistant's answer begins."""
        tok = self.state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        from jinja2 import TemplateError

        messages = chat_messages(req)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template refuses this conversation (a role it lacks, roles out of order)
            folded = fold_system(messages)
            try:
                if folded is None:
                    raise
                text = tok.apply_chat_template(folded, add_generation_prompt=True, tokenize=False)
            except TemplateError:
                raise ApiError(400, f"the model's chat template rejected the messages: {exc}",
                               param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    def choice(self, gen: Generation, text: str, entries: list[dict], finish: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs_block(self.state.tokenizer, entries) if gen.params.logprobs is not None
                else None,
                "finish_reason": finish}

    def opening_choices(self, gen: Generation, stream: StreamState) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def delta_choice(self, gen: Generation, stream: StreamState, event: dict) -> dict:
        entries = event["logprobs"]
        lp = chat_logprobs_block(self.state.tokenizer, entries) if gen.params.logprobs is not None and entries else None
        return {"index": 0, "delta": {"content": event["text"]}, "logprobs": lp, "finish_reason": None}

    def final_choice(self, gen: Generation, stream: StreamState, finish: str) -> dict:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}


def fold_system(messages: list[dict]) -> list[dict] | None:
    """A conversation for a chat template without a system role (Gemma 2's raises on one): the system messages at
    its start joined into the first user message, before its text and a blank line, as Gemma 3's own template
    does it. None where there is nothing to fold (no leading system message, or no user message to carry it)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n == 0 or n == len(messages) or messages[n]["role"] != "user":
        return None
    system = "\n\n".join(m["content"] for m in messages[:n])
    first = {**messages[n], "content": f"{system}\n\n{messages[n]['content']}"}
    return [first, *messages[n + 1:]]
