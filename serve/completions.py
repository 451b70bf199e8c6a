"""`POST /v1/completions`: the legacy text completion, its prompt, budget and response shapes.

The prompt is a string or token ids (one prompt per request); the answer is `text_completion` objects, whole or
streamed, with the legacy `logprobs` block (tokens, token_logprobs, top_logprobs, text_offset).

`echo: true` puts the prompt's text before the completion's and, with `logprobs: N`, scores the prompt too: the
block then begins with the prompt's tokens (the first one's logprob and alternatives null, since nothing
predicts it), and `max_tokens: 0` returns the prompt alone. That is how lm-evaluation-harness
(`--model local-completions`) asks for the log-likelihood of a continuation.
"""

from __future__ import annotations

import asyncio

from slimlm.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    CompletionRequest,
    completion_logprobs,
    completion_logprobs_block,
    sampling_params,
    stop_list,
)
from slimlm.serve.serving import Generation, OpenAIServing, StreamState


class ServingCompletion(OpenAIServing):
    id_prefix = "cmpl"
    response_object = "text_completion"
    chunk_object = "text_completion"

    async def prepare(self, req: CompletionRequest) -> Generation:
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        # in a worker thread (the tokenizer releases the GIL): a prompt of a few megabytes takes seconds, during
        # which the event loop would send no stream chunk and answer no request
        ids = await asyncio.to_thread(self.prompt_ids, req)
        params = sampling_params(req, completion_logprobs(req))
        max_tokens = self.budget(ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens", "prompt",
                                 minimum=0 if req.echo else 1)
        return Generation(req, ids, params, max_tokens, stop_list(req),
                          prompt_logprobs=params.logprobs if req.echo else None)

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.state.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.state.backend.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def prompt_text(self, gen: Generation) -> str:
        """The prompt as echoed: the text sent, or the decoded token ids."""
        prompt = gen.req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else self.state.tokenizer.decode(gen.ids)

    def choice(self, gen: Generation, text: str, entries: list[dict], finish: str) -> dict:
        if gen.req.echo:
            text = self.prompt_text(gen) + text
            entries = (gen.prompt_entries or []) + entries
        lp = completion_logprobs_block(self.state.tokenizer, entries, 0) if gen.params.logprobs is not None else None
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def opening_choices(self, gen: Generation, stream: StreamState) -> list[dict]:
        if not gen.req.echo:
            return []
        text, lp = self.prompt_text(gen), None
        if gen.params.logprobs is not None:
            lp = completion_logprobs_block(self.state.tokenizer, gen.prompt_entries or [], 0)
        stream.offset = len(text)
        return [{"index": 0, "text": text, "logprobs": lp, "finish_reason": None}]

    def delta_choice(self, gen: Generation, stream: StreamState, event: dict) -> dict:
        text, entries = event["text"], event["logprobs"]
        lp = None
        if gen.params.logprobs is not None and entries:
            lp = completion_logprobs_block(self.state.tokenizer, entries, stream.offset)
        stream.offset += len(text)
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": None}

    def final_choice(self, gen: Generation, stream: StreamState, finish: str) -> dict:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
