"""The OpenAI wire format: request validation, error bodies, response and stream-chunk builders.

Requests are validated strictly (a string where a number belongs is a 400, not a silent coercion), and
every failure becomes `{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slimlm.serve.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
        413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "api_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Request):
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """The body of `POST /tokenize`: `prompt` (a string) or `messages` (a chat, through the chat template).

    For the published schema; the route checks these fields itself (its error messages predate this model)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """The body of `POST /detokenize`. For the published schema; the route checks these fields itself."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    tokens: list[int]


# Request fields a client may send that change what it gets back, which this server does not implement: refused
# (400) rather than silently ignored, unless empty or one of the harmless values listed here.
UNSUPPORTED = {"logit_bias": (), "tools": (), "functions": (), "tool_choice": ("auto",), "function_call": ("auto",),
               "response_format": ({"type": "text"},)}
EMPTY = (None, {}, [], "none")
ROLES = ("system", "developer", "user", "assistant")


def bad_unicode(value: Any, where: str = "") -> str | None:
    """Where in a JSON value a string holds an unpaired surrogate (JSON allows the escape, UTF-8 does not)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = bad_unicode(k, where or "body") or bad_unicode(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = bad_unicode(v, f"{where}[{i}]")
            if found:
                return found
    return None


# What the fields that take several shapes accept, for their error messages: pydantic names the union member it
# tried last (`prompt.list[list[int]].0: Input should be a valid list`), which reads as an internal.
UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
                "stop": "a string or a list of at most 4 strings"}


def _invalid(err: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic error, in the client's terms."""
    loc = list(err.get("loc", ()))
    if not loc:
        return f"invalid request body: {err.get('msg', 'invalid')}", None
    param = str(loc[0])
    if err.get("type") == "missing":
        return f"{param} is required", param
    if param in UNION_FIELDS:
        return f"invalid value for {param}: expected {UNION_FIELDS[param]}", param
    where = param + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
    return f"invalid value for {where}: {err.get('msg', 'invalid')}", param


def parse(cls, body: Any):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, *_invalid(exc.errors()[0])) from None
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in EMPTY + allowed:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if req.n is not None and req.n < 1:
        raise ApiError(400, f"n must be at least 1, got {req.n}", param="n")
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if req.stream_options is not None and not isinstance(req.stream_options.get("include_usage", False), bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean", param="stream_options")
    return req


def stop_list(req) -> list[str]:
    stop = req.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must be non-empty strings", param="stop")
    return stops


def sampling_params(req, logprobs: int | None) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    try:
        return SamplingParams(
            temperature=pick(req.temperature, 1.0), top_p=pick(req.top_p, 1.0), top_k=pick(req.top_k, 0),
            min_p=pick(req.min_p, 0.0), presence_penalty=pick(req.presence_penalty, 0.0),
            frequency_penalty=pick(req.frequency_penalty, 0.0), repetition_penalty=pick(req.repetition_penalty, 1.0),
            seed=req.seed, logprobs=logprobs,
        )
    except ValueError as exc:
        message, param = exc.args if len(exc.args) == 2 else (str(exc), None)
        raise ApiError(400, message, param=param) from None


def completion_logprobs(req: CompletionRequest) -> int | None:
    if req.logprobs is None:
        return None
    if not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {req.logprobs}",
                       param="logprobs")
    return req.logprobs


def chat_logprobs(req: ChatRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                           param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as {role, content: str} for the chat template; developer becomes system."""
    out = []
    if not req.messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    for i, m in enumerate(req.messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ApiError(400, f"messages[{i}].role must be a string", param="messages")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           param="messages")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        # OpenAI's newer name for the system message; chat templates know only "system" (Llama's and Qwen's add
        # their own default system prompt when the first message is not one, and print "developer" as a role).
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_logprobs_block(tokenizer, entries: list[dict], offset: int) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset (an echoed
    prompt's first token has a null logprob and null alternatives)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text = tokenizer.decode([e["id"]])
        tokens.append(text)
        lps.append(e["logprob"])
        tops.append({tokenizer.decode([i]): lp for i, lp in e["top"]} if e["top"] else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs_block(tokenizer, entries: list[dict]) -> dict:
    def item(i: int, lp: float) -> dict:
        text = tokenizer.decode([i])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(e["id"], e["logprob"]), top_logprobs=[item(i, lp) for i, lp in e["top"]])
                        for e in entries], "refusal": None}


def server_timing(timings: dict) -> str:
    """The `Server-Timing` header value from a timings dict."""
    parts = []
    for key, name in (("queue_ms", "queue"), ("prefill_ms", "prefill"), ("ttft_ms", "ttft"),
                      ("decode_ms_per_token", "decode-per-token"), ("e2e_ms", "total")):
        if timings.get(key) is not None:
            parts.append(f"{name};dur={timings[key]:.3f}")
    return ", ".join(parts)
