"""Serving code under the routes: the server's shared state, and the request pump every endpoint kind runs.

A route parses its body and hands the request to the serving object of its kind (`serve/completions.py`,
`serve/chat.py`). `OpenAIServing` holds what the kinds share: the context budget, the pump that submits a
`GenRequest` to the engine and waits for its events (aborting it when the client hangs up), and the framing of
a JSON response and of an SSE stream (ids, `usage`, `timings`, `Server-Timing`, the error event, `[DONE]`).
A kind supplies only what differs: how its prompt is built, and the shape of its choices.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from slimlm.errors import SlimlmError
from slimlm.serve.config import ServeConfig
from slimlm.serve.engine import Engine, GenRequest, NotAccepting, QueueFull
from slimlm.serve.protocol import ApiError, error_body, new_id, now, server_timing
from slimlm.serve.sampling import SamplingParams

log = logging.getLogger("slimlm.serve")

RETRY_AFTER_S = 1  # what a 429 asks the client to wait; a decode step is well under a second


class ServerState:
    """What the routes share: config, engine, tokenizer, metrics, and whether loading finished."""

    def __init__(self, config: ServeConfig):
        from slimlm.serve.metrics import Metrics

        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.tokenizer = None
        self.backend = None
        self.info: dict = {}
        self.record: dict = {}  # the model's slimlm.json, when it has one
        self.load_error: str | None = None
        self.on_load_error = None  # set by `serve` to stop uvicorn when the model cannot load
        self.created = now()

    def ready(self, backend, tokenizer) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.info = backend.info()
        self.info["max_model_len"] = backend.max_len
        self.record = _record(backend)
        self.metrics.model_size.set(self.info.get("size_bytes") or 0)
        engine = Engine(backend, tokenizer, self.config.max_batch, self.config.max_queue, metrics=self.metrics)
        self.metrics.bind(engine)
        engine.start()
        self.engine = engine
        log.info("ready: %s (%s), context %d tokens", self.config.name, self.info.get("backend"), backend.max_len)

    def load(self) -> None:
        from slimlm.serve.backends import load_backend

        try:
            backend, tokenizer = load_backend(self.config)
            self.ready(backend, tokenizer)
        except SlimlmError as exc:
            self.load_error = str(exc)
            log.error("cannot load %s: %s", self.config.model, exc)
        except Exception as exc:  # reported through /health and every route instead of a dead thread
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading failed")
        if self.load_error and self.on_load_error is not None:
            self.on_load_error()

    def require_engine(self) -> Engine:
        if self.engine is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}")
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        if not self.engine.accepting:
            raise ApiError(503, "the server is shutting down")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.config.name!r}",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        """The `/v1/models` entry of the served model."""
        config = self.config
        return {"id": config.name, "object": "model", "created": self.created, "owned_by": "slimlm",
                "root": config.model, "max_model_len": self.backend.max_len,
                "context_length": self.backend.max_len, "slimlm": self.model_info()}

    def model_info(self) -> dict:
        info = dict(self.info)
        compressed = compression(self.record)
        if compressed:
            info["compressed"] = compressed
        if self.config.quantize:
            info["quantize"] = self.config.quantize
        return info


def _record(backend) -> dict:
    """The served model's `slimlm.json`: loaded with the PyTorch model, read beside an ONNX export."""
    from slimlm.models import read_slimlm_json

    record = getattr(getattr(backend, "model", None), "slimlm_info", None)
    if record is None and getattr(backend, "path", ""):
        try:
            record = read_slimlm_json(backend.path)
        except SlimlmError as exc:  # the model card goes without it; serving does not depend on it
            log.warning("%s", exc)
    return record if isinstance(record, dict) else {}


def compression(record: dict) -> dict:
    """What `slimlm compress` did, from the record it wrote (empty for a model it did not compress): the method,
    the replacement of the removed layers, which layers, and the layer and parameter counts before and after."""

    def part(key: str) -> dict:
        value = record.get(key)
        return value if isinstance(value, dict) else {}

    summary = {"method": part("config").get("method"), "replacement": part("replacement").get("kind"),
               "removed_layers": part("selection").get("removed_layers")}
    for key in ("layers_before", "layers_after", "params_before", "params_after"):
        summary[key] = record.get(key)
    return {k: v for k, v in summary.items() if v is not None} if summary["removed_layers"] is not None else {}


@dataclass
class Generation:
    """One request as the engine will run it: the prompt ids, how to sample, the token budget and stop strings,
    with the parsed request (`req`) the response is shaped from."""

    req: Any
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stops: list[str]
    prompt_logprobs: int | None = None  # score the prompt: each token's logprob and this many alternatives
    prompt_entries: list[dict] | None = None  # filled in from the engine's "prompt" event


@dataclass
class StreamState:
    """What a stream's choices carry from one chunk to the next."""

    offset: int = 0  # characters of text sent so far (the completions `text_offset`)


class _Disconnected(Exception):
    pass


async def _watch_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    """The request pump and the response framing shared by the endpoint kinds (see the module docstring).

    A kind sets `id_prefix`, `response_object` and `chunk_object`, and implements `prepare` (the request as a
    `Generation`), `choice` (the choice of a whole response), and `opening_choices`, `delta_choice` and
    `final_choice` (the choices of a stream's first chunks, of each piece of text, and of its last chunk).
    """

    id_prefix = ""
    response_object = ""
    chunk_object = ""

    def __init__(self, state: ServerState):
        self.state = state

    async def create(self, req, request) -> Response:
        """Answer a parsed request: a JSON response, or an SSE stream when it asks for one."""
        engine = self.state.require_engine()
        self.state.check_model(req.model)
        gen = await self.prepare(req)
        return await self._run(request, engine, gen)

    # ---------------------------------------------------------------------------------------------
    # what a kind supplies

    async def prepare(self, req) -> Generation:
        raise NotImplementedError

    def choice(self, gen: Generation, text: str, entries: list[dict], finish: str) -> dict:
        raise NotImplementedError

    def opening_choices(self, gen: Generation, stream: StreamState) -> list[dict]:
        return []

    def delta_choice(self, gen: Generation, stream: StreamState, event: dict) -> dict:
        raise NotImplementedError

    def final_choice(self, gen: Generation, stream: StreamState, finish: str) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------
    # shared

    def budget(self, prompt_ids: list[int], max_tokens: int | None, default: int | None, param: str,
               prompt_param: str, minimum: int = 1) -> int:
        """How many tokens the completion may take: `max_tokens` if it fits the context, else a 400; when not
        given, `default` or the rest of the context, whichever is less. `minimum` 0 lets a request generate
        nothing (an echo that only scores its prompt)."""
        ctx = self.state.backend.max_len
        n = len(prompt_ids)
        if max_tokens is not None and max_tokens < minimum:
            raise ApiError(400, f"{param} must be at least {minimum}, got {max_tokens}", param=param)
        if max_tokens == 0 and n <= ctx:
            return 0
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                                f"{n} tokens, leaving no room for a completion.", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return min(default, ctx - n) if default else ctx - n
        if n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                                f"Please reduce the prompt or {param}.", param=param, code="context_length_exceeded")
        return max_tokens

    async def _run(self, request, engine: Engine, gen: Generation) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: dict) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = GenRequest(gen.ids, gen.params, gen.max_tokens, sink, gen.stops, prompt_logprobs=gen.prompt_logprobs)
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc)) from None
        created, rid = now(), new_id(self.id_prefix)
        watcher = asyncio.ensure_future(_watch_disconnect(request))
        try:
            if gen.req.stream:
                first = await _next_event(queue, watcher)
                if first["type"] == "prompt":
                    gen.prompt_entries = first["logprobs"]
                    first = await _next_event(queue, watcher)
            else:
                events = []
                while True:
                    event = await _next_event(queue, watcher)
                    if event["type"] == "prompt":
                        gen.prompt_entries = event["logprobs"]
                        continue
                    events.append(event)
                    if event["type"] != "delta":
                        break
        except _Disconnected:
            engine.abort(job)
            return Response(status_code=499)
        finally:
            watcher.cancel()
        if gen.req.stream:
            if first["type"] == "error":
                engine.abort(job)
                raise ApiError(500, first["message"])
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                       "Server-Timing": server_timing(_early_timings(job))}
            body = self._stream(engine, job, queue, first, gen, rid, created)
            return _GenerationStream(engine, job, body, media_type="text/event-stream", headers=headers)
        return self._respond(gen, events, rid, created)

    def _respond(self, gen: Generation, events: list[dict], rid: str, created: int) -> JSONResponse:
        last = events[-1]
        if last["type"] == "error":
            raise ApiError(500, last["message"])
        text = "".join(e["text"] for e in events[:-1])
        entries = [lp for e in events[:-1] for lp in e["logprobs"]]
        body = {"id": rid, "object": self.response_object, "created": created, "model": self.state.config.name,
                "system_fingerprint": None, "choices": [self.choice(gen, text, entries, last["finish_reason"])],
                "usage": last["usage"], "timings": last["timings"]}
        return JSONResponse(body, headers={"Server-Timing": server_timing(last["timings"])})

    async def _stream(self, engine: Engine, job: GenRequest, queue: asyncio.Queue, first: dict, gen: Generation,
                      rid: str, created: int):
        include_usage = bool((gen.req.stream_options or {}).get("include_usage"))
        stream = StreamState()

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": self.chunk_object, "created": created, "model": self.state.config.name,
                    "system_fingerprint": None, "choices": choices}
            if include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        finished = False
        try:
            for choice in self.opening_choices(gen, stream):
                yield chunk([choice])
            event = first
            while True:
                if event["type"] == "delta":
                    yield chunk([self.delta_choice(gen, stream, event)])
                elif event["type"] == "done":
                    finished = True
                    yield chunk([self.final_choice(gen, stream, event["finish_reason"])], timings=event["timings"])
                    if include_usage:
                        body = chunk([], timings=event["timings"])
                        yield body.replace('"usage":null', '"usage":' + json.dumps(event["usage"],
                                                                                   separators=(",", ":")), 1)
                    break
                else:
                    finished = True
                    err = error_body(event["message"], "internal_server_error", None, None)
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                event = await queue.get()
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                engine.abort(job)


async def _next_event(queue: asyncio.Queue, watcher: asyncio.Future) -> dict:
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise _Disconnected


class _GenerationStream(StreamingResponse):
    """A streamed generation that is aborted however the response ends. The body generator's own `finally` does not
    run when the client hangs up before the generator first runs (while the headers are sent)."""

    def __init__(self, engine: Engine, job: GenRequest, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine, self.job = engine, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished:
                self.engine.abort(self.job)


def _early_timings(job: GenRequest) -> dict:
    """Timings known when a stream starts (its first token is out)."""
    t0 = job.arrival
    out = {"queue_ms": 1000 * ((job.t_scheduled or t0) - t0)}
    if job.t_first:
        out["prefill_ms"] = 1000 * (job.t_first - (job.t_scheduled or t0))
        out["ttft_ms"] = 1000 * (job.t_first - t0)
    return out
