"""The FastAPI app: OpenAI-compatible routes, plus health, tokenizer and metrics routes, auth and error shapes.

The routes are thin: they read and validate the body, then hand the request to the serving object of its kind
(`ServingCompletion`, `ServingChat`), which builds the prompt, budgets it and shapes the JSON or SSE answer.

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
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from slimlm import __version__
from slimlm.errors import SlimlmError
from slimlm.serve.chat import ServingChat
from slimlm.serve.completions import ServingCompletion
from slimlm.serve.config import ServeConfig
from slimlm.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_unicode,
    error_body,
    parse,
)
from slimlm.serve.serving import ServerState

log = logging.getLogger("slimlm.serve")

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers and HEALTHCHECK have none)


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

    # The OpenAPI spec and its Swagger page sit behind the API key like the routes they describe (AuthMiddleware).
    app = FastAPI(title="slimlm", version=__version__, lifespan=lifespan, openapi_url="/openapi.json",
                  docs_url="/docs", redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    app.state.slimlm = state
    completion, chat = ServingCompletion(state), ServingChat(state)
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
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.require_engine()
        state.check_model(name)
        return state.model_card()

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(request: Request):
        state.require_engine()  # the tokenizer comes with the model
        body = await read_json(request, config.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        state.check_model(body.get("model"))
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise ApiError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
        if "messages" in body:
            ids = await asyncio.to_thread(chat.prompt_ids, parse(ChatRequest, {"messages": body["messages"]}))
        elif isinstance(body.get("prompt"), str):
            ids = await asyncio.to_thread(state.tokenizer.encode, body["prompt"], add_special_tokens=add_special)
        else:
            raise ApiError(400, "give prompt (a string) or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.backend.max_len}

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
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

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request):
        state.require_engine()
        req = parse(CompletionRequest, await read_json(request, config.max_body_bytes))
        return await completion.create(req, request)

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatRequest))
    async def chat_completions(request: Request):
        state.require_engine()
        req = parse(ChatRequest, await read_json(request, config.max_body_bytes))
        return await chat.create(req, request)

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = default_openapi()
            if config.api_key:  # say so in the spec, so that clients generated from it send the key
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in spec["paths"].items():
                    if path not in OPEN_PATHS:
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi
    return app


def request_body(model) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself (body limit, strict validation with OpenAI's
    error shape): the route declares no body parameter, so FastAPI neither validates nor documents one."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


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
