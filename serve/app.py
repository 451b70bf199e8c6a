"""The FastAPI app: OpenAI-compatible routes over the engine, plus health, tokenizer and metrics routes.

`create_app(config)` returns an app whose lifespan loads the model in a background thread (so
`/health` answers 503 while loading and 200 once ready), runs the engine thread, and on shutdown
drains: uvicorn stops accepting connections on SIGTERM, in-flight requests finish, then the engine
stops. Tests pass a ready `backend` and `tokenizer` to skip loading.

FastAPI is imported at module level here (route signatures need it); only `slimlm serve` imports this
module. Every failure, including unknown routes and unexpected exceptions, answers with the OpenAI error
shape; no HTML page, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from slimlm.serve.config import ServeConfig
from slimlm.serve.engine import Engine, GenRequest, NotAccepting, QueueFull
from slimlm.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    bad_unicode,
    chat_logprobs,
    chat_logprobs_block,
    chat_messages,
    completion_logprobs,
    completion_logprobs_block,
    error_body,
    new_id,
    now,
    parse,
    sampling_params,
    server_timing,
    stop_list,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from slimlm.errors import SlimlmError

log = logging.getLogger("slimlm.serve")

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers and HEALTHCHECK have none)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait; a decode step is well under a second


class _Disconnected(Exception):
    pass


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
        self.load_error: str | None = None
        self.on_load_error = None  # set by `serve` to stop uvicorn when the model cannot load
        self.created = now()

    def ready(self, backend, tokenizer) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.info = backend.info()
        self.info["max_model_len"] = backend.max_len
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


class AuthMiddleware:
    """Bearer-key check on every route but /health; the key is compared in constant time and never logged."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and scope.get("path") not in OPEN_PATHS:
            token = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    scheme, _, rest = value.partition(b" ")
                    if scheme.lower() == b"bearer":
                        token = rest.strip()
            if not hmac.compare_digest(token, self.key):
                body = json.dumps(error_body("invalid or missing API key (send Authorization: Bearer KEY)",
                                             "authentication_error", None, "invalid_api_key")).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def read_json(request, limit: int):
    """The body as JSON; 413 past `limit` bytes (checked on the header and while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
        bad = bad_unicode(body)  # JSON allows a lone surrogate escape; the tokenizer (and UTF-8) does not
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays or objects nested thousands deep: the parser (or the walk) runs out of stack
        raise ApiError(400, "the request body is nested too deeply") from None
    if bad is not None:
        raise ApiError(400, f"{bad} is not valid Unicode text (an unpaired surrogate escape)",
                       param=re.split(r"[.\[]", bad)[0])
    return body


async def _watch_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: ServeConfig, *, backend=None, tokenizer=None):
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if backend is not None:
            state.ready(backend, tokenizer)
        else:
            threading.Thread(target=state.load, name="slimlm-load", daemon=True).start()
        yield
        if state.engine is not None:
            # uvicorn has already waited for open requests; anything left (a stuck client) is cut off here.
            await asyncio.to_thread(state.engine.stop, True, 30.0)

    app = FastAPI(title="slimlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slimlm = state
    app.add_middleware(AuthMiddleware, key=config.api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        type_ = ApiError.TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, type_, None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body(f"invalid request: {exc.errors()[0].get('msg')}", "invalid_request_error"),
                            status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request, exc):  # hung up while sending its body: nobody to answer, nothing went wrong
        log.debug("client disconnected during the request body on %s", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "internal_server_error"),
                            status_code=500)

    # ---------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if state.engine is not None and state.engine.accepting:
            return {"status": "ok"}
        status = "error" if state.load_error else ("draining" if state.engine is not None else "loading")
        body = {"status": status}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        state.require_engine()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.require_engine()
        state.check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": config.name, "object": "model", "created": state.created, "owned_by": "slimlm",
                "root": config.model, "max_model_len": state.backend.max_len,
                "context_length": state.backend.max_len, "slimlm": model_info()}

    def model_info() -> dict:
        info = dict(state.info)
        model = getattr(state.backend, "model", None)
        meta = getattr(model, "slimlm_info", None) or {}
        if meta:
            sel = meta.get("selection") or {}
            info["compressed"] = {k: v for k, v in {"method": meta.get("method") or sel.get("method"),
                                                    "removed_layers": sel.get("removed_layers"),
                                                    "params_before": meta.get("params_before"),
                                                    "params_after": meta.get("params_after")}.items()
                                  if v is not None}
        if config.quantize:
            info["quantize"] = config.quantize
        return info

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        engine_ready = state.require_engine()  # noqa: F841  (the tokenizer comes with the model)
        body = await read_json(request, config.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        state.check_model(body.get("model"))
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise ApiError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
        if "messages" in body:
            ids = await asyncio.to_thread(chat_prompt, parse(ChatRequest, {"messages": body["messages"]}))
        elif isinstance(body.get("prompt"), str):
            ids = await asyncio.to_thread(state.tokenizer.encode, body["prompt"], add_special_tokens=add_special)
        else:
            raise ApiError(400, "give prompt (a string) or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.backend.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        state.require_engine()
        body = await read_json(request, config.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        state.check_model(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "tokens must be a list of integers", param="tokens")
        vocab = len(state.tokenizer)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": state.tokenizer.decode(tokens)}

    # The two prompt builders below run in a worker thread (the tokenizer releases the GIL): a prompt of a few
    # megabytes takes seconds, during which the event loop would send no stream chunk and answer no request.
    def chat_prompt(req: ChatRequest) -> list[int]:
        tok = state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", param="messages")
        from jinja2 import TemplateError

        messages = chat_messages(req)
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template refuses this conversation (a role it lacks, roles out of order)
            raise ApiError(400, f"the model's chat template rejected the messages: {exc}", param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    def completion_prompt(req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported: send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = state.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = state.backend.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def budget(prompt_ids: list[int], max_tokens: int | None, default: int | None, param: str) -> int:
        ctx = state.backend.max_len
        n = len(prompt_ids)
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
        if n >= ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                                f"{n} tokens, leaving no room for a completion.", param="messages"
                           if param == "max_completion_tokens" else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(default, ctx - n) if default else ctx - n
        if n + max_tokens > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion). "
                                f"Please reduce the prompt or {param}.", param=param, code="context_length_exceeded")
        return max_tokens

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = state.require_engine()
        req = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        state.check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        ids = await asyncio.to_thread(completion_prompt, req)
        params = sampling_params(req, completion_logprobs(req))
        max_tokens = budget(ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens")
        return await run(request, engine, "completion", req, ids, params, max_tokens, stop_list(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine = state.require_engine()
        req = parse(ChatRequest, await read_json(request, config.max_body_bytes))
        state.check_model(req.model)
        ids = await asyncio.to_thread(chat_prompt, req)
        params = sampling_params(req, chat_logprobs(req))
        wanted, param = req.max_completion_tokens, "max_completion_tokens"
        if wanted is None and req.max_tokens is not None:
            wanted, param = req.max_tokens, "max_tokens"
        max_tokens = budget(ids, wanted, None, param)
        return await run(request, engine, "chat", req, ids, params, max_tokens, stop_list(req))

    # ---------------------------------------------------------------------------------------------

    async def run(request, engine: Engine, kind: str, req, ids, params, max_tokens, stops):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: dict) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        gen = GenRequest(ids, params, max_tokens, sink, stops)
        try:
            engine.submit(gen)
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotAccepting as exc:
            raise ApiError(503, str(exc)) from None
        created, rid = now(), new_id("chatcmpl" if kind == "chat" else "cmpl")
        watcher = asyncio.ensure_future(_watch_disconnect(request))
        try:
            if req.stream:
                first = await _next_event(queue, watcher)
            else:
                events = []
                while True:
                    event = await _next_event(queue, watcher)
                    events.append(event)
                    if event["type"] != "delta":
                        break
        except _Disconnected:
            engine.abort(gen)
            return Response(status_code=499)
        finally:
            watcher.cancel()
        if req.stream:
            if first["type"] == "error":
                engine.abort(gen)
                raise ApiError(500, first["message"])
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                       "Server-Timing": server_timing(_early_timings(gen))}
            body = _stream(engine, gen, queue, first, kind, rid, created, include_usage, params.logprobs)
            return _GenerationStream(engine, gen, body, media_type="text/event-stream", headers=headers)
        return _respond(events, kind, rid, created, params.logprobs)

    async def _next_event(queue: asyncio.Queue, watcher: asyncio.Future) -> dict:
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        raise _Disconnected

    def _respond(events: list[dict], kind, rid, created, logprobs):
        last = events[-1]
        if last["type"] == "error":
            raise ApiError(500, last["message"])
        text = "".join(e["text"] for e in events[:-1])
        entries = [lp for e in events[:-1] for lp in e["logprobs"]]
        tok = state.tokenizer
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": chat_logprobs_block(tok, entries) if logprobs is not None else None,
                      "finish_reason": last["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text,
                      "logprobs": completion_logprobs_block(tok, entries, 0) if logprobs is not None else None,
                      "finish_reason": last["finish_reason"]}
            obj = "text_completion"
        body = {"id": rid, "object": obj, "created": created, "model": config.name, "system_fingerprint": None,
                "choices": [choice], "usage": last["usage"], "timings": last["timings"]}
        return JSONResponse(body, headers={"Server-Timing": server_timing(last["timings"])})

    async def _stream(engine, gen, queue, first, kind, rid, created, include_usage, logprobs):
        tok = state.tokenizer
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        offset = 0

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": config.name,
                    "system_fingerprint": None, "choices": choices}
            if include_usage:
                body["usage"] = None
            body.update(extra)
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        def delta_choice(event: dict | None, finish: str | None) -> dict:
            nonlocal offset
            text = event["text"] if event else ""
            entries = event["logprobs"] if event else []
            if kind == "chat":
                lp = chat_logprobs_block(tok, entries) if logprobs is not None and entries else None
                delta = {"content": text} if event else {}
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                lp = completion_logprobs_block(tok, entries, offset) if logprobs is not None and entries else None
                choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            offset += len(text)
            return choice

        finished = False
        try:
            if kind == "chat":
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            event = first
            while True:
                if event["type"] == "delta":
                    yield chunk([delta_choice(event, None)])
                elif event["type"] == "done":
                    finished = True
                    yield chunk([delta_choice(None, event["finish_reason"])], timings=event["timings"])
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
                engine.abort(gen)

    return app


class _GenerationStream(StreamingResponse):
    """A streamed generation that is aborted however the response ends. The body generator's own `finally` does not
    run when the client hangs up before the generator first runs (while the headers are sent)."""

    def __init__(self, engine: Engine, gen: GenRequest, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine, self.gen = engine, gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.gen.finished:
                self.engine.abort(self.gen)


def _early_timings(gen: GenRequest) -> dict:
    """Timings known when a stream starts (its first token is out)."""
    t0 = gen.arrival
    out = {"queue_ms": 1000 * ((gen.t_scheduled or t0) - t0)}
    if gen.t_first:
        out["prefill_ms"] = 1000 * (gen.t_first - (gen.t_scheduled or t0))
        out["ttft_ms"] = 1000 * (gen.t_first - t0)
    return out


def _draining_server_class():
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that a drained SIGTERM/SIGINT ends the process with status 0 instead of re-raising
        the signal (a second signal still forces the exit)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
            else:
                log.info("signal %d: draining in-flight requests, then exiting", sig)
            self.should_exit = True

    return DrainingServer


def serve(config: ServeConfig) -> int:
    """Run uvicorn until SIGTERM/SIGINT, then drain; a model that cannot load stops the server with its error."""
    import uvicorn

    _DrainingServer = _draining_server_class()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    state: ServerState = app.state.slimlm
    server = _DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                            timeout_graceful_shutdown=None))
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    log.info("serving %s on http://%s:%d (backend %s)%s", config.name, config.host, config.port, config.backend,
             " with an API key" if config.api_key else "")
    started = time.perf_counter()
    server.run()
    if state.load_error:
        raise SlimlmError(state.load_error)
    log.info("stopped after %.0f s", time.perf_counter() - started)
    return 0
