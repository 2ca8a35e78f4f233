"""The HTTP side of ``peftlab serve``: an OpenAI-compatible API on FastAPI.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``model`` = an adapter
name, adapter names joined with ``+`` for their ``Stack``, or the base model's name; ``stream``
for server-sent events), ``GET /v1/models``,
``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}`` (load and unload while serving, only
with adapter roots), ``GET /health``, ``GET /metrics`` (Prometheus). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. With an API key every request needs
``Authorization: Bearer KEY``; request bodies larger than ``max_body_bytes`` get 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftlab.serving.chat import parse_messages, render_chat
from peftlab.serving.engine import Engine, Job, SamplingParams, ServeError, StreamChunk
from peftlab.serving.metrics import CONTENT_TYPE_LATEST

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_STOP = 4  # as OpenAI
MAX_BODY_BYTES = 1 << 20
DEFAULT_CHAT_MAX_TOKENS = 512  # a chat request without max_tokens stops here (or at the context's end)
UNION_FIELDS = {"prompt": "a string or a list of strings", "stop": "a string, a list of strings or null"}


# strict: a number sent as a string ("5") or a boolean where a number belongs is a 422 naming the
# field, not coerced (pydantic's lax mode takes "5" and true as integers)
STRICT = ConfigDict(extra="ignore", strict=True)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completions request; fields peftlab does not implement must keep their defaults."""

    # clients send fields of newer API versions; ignoring unknown ones is what OpenAI does too
    model_config = STRICT

    model: str
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completions request; ``messages`` is checked by hand (400 naming the field)."""

    model_config = STRICT

    model: str
    messages: Any = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


class AdapterRequest(BaseModel):
    model_config = STRICT

    name: str
    path: str


def _refuse(checks: list[tuple[bool, str, str]]) -> None:
    for failed, param, message in checks:
        if failed:
            raise ServeError(400, message, param=param)


def _unsupported(req: CompletionRequest) -> None:
    _refuse(
        [
            (req.n != 1, "n", "n must be 1 (send the prompt several times for more completions)"),
            (req.best_of not in (None, 1), "best_of", "best_of is not supported"),
            (req.echo, "echo", "echo is not supported"),
            (req.logprobs is not None, "logprobs", "logprobs are not supported"),
            (req.suffix is not None, "suffix", "suffix (insertion) is not supported"),
            (req.presence_penalty != 0, "presence_penalty", "presence_penalty is not supported"),
            (req.frequency_penalty != 0, "frequency_penalty", "frequency_penalty is not supported"),
            (bool(req.logit_bias), "logit_bias", "logit_bias is not supported"),
        ]
    )


def _chat_unsupported(req: ChatRequest) -> None:
    plain_text = req.response_format is None or req.response_format.get("type") == "text"
    _refuse(
        [
            (req.n != 1, "n", "n must be 1 (send the request several times for more completions)"),
            (bool(req.logprobs) or req.top_logprobs is not None, "logprobs", "logprobs are not supported"),
            (req.presence_penalty != 0, "presence_penalty", "presence_penalty is not supported"),
            (req.frequency_penalty != 0, "frequency_penalty", "frequency_penalty is not supported"),
            (bool(req.logit_bias), "logit_bias", "logit_bias is not supported"),
            (bool(req.tools), "tools", "tools (function calling) are not supported"),
            (req.tool_choice not in (None, "none"), "tool_choice", "tool_choice is not supported"),
            (not plain_text, "response_format", "response_format other than text is not supported"),
        ]
    )


def _sampling(
    max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: str | list[str] | None
) -> SamplingParams:
    if not 0.0 <= temperature <= 2.0:
        raise ServeError(
            400,
            f"temperature must be between 0 and 2 (0: greedy), got {temperature}",
            param="temperature",
        )
    if not 0.0 < top_p <= 1.0:
        raise ServeError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ServeError(400, f"seed must be an integer from -2**63 to 2**64 - 1, got {seed}", param="seed")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ServeError(400, f"stop takes up to {MAX_STOP} non-empty strings", param="stop")
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stops)
    )


def check_text(value: Any, param: str) -> None:
    """400 where a string anywhere in ``value`` is not valid Unicode text: JSON's ``\\ud800``
    escapes decode to lone surrogates, which no tokenizer (and no UTF-8 writer) takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ServeError(
                400,
                f"{param} holds a lone surrogate at character {err.start} ({value[err.start]!a}), which "
                "is not text; send valid UTF-8 (a pair of surrogates for characters beyond U+FFFF)",
                param=param,
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            check_text(item, f"{param}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{param}[{i}]")


def _checked_fields(req: BaseModel) -> None:
    """Every string field of a request is text (see :func:`check_text`)."""
    for name in type(req).model_fields:
        check_text(getattr(req, name), name)


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(
        _error_body(err.status, err.message, err.kind, err.param), status_code=err.status, headers=err.headers
    )


def _validation_message(err: RequestValidationError) -> tuple[int, str]:
    """(status, message): 400 for a body that is not JSON, 422 naming each bad field."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            detail = e.get("ctx", {}).get("error", "")
            return 400, f"the request body is not valid JSON ({detail}); send a JSON object"
        if e.get("type") == "missing":
            problems.append(f"missing field {where!r}")
        elif not where:
            problems.append(f"the body must be a JSON object ({e.get('msg')})")
        elif loc[0] in UNION_FIELDS:
            # pydantic reports one error per member of the union; say once what is accepted
            problems.append(f"field {loc[0]!r} must be {UNION_FIELDS[loc[0]]}")
        else:
            problems.append(f"field {where!r}: {e.get('msg')}")
    return 422, "invalid request: " + "; ".join(dict.fromkeys(problems))


async def _send_error(
    send: Send,
    receive: Receive,
    scope: Scope,
    status: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
) -> None:
    response = JSONResponse(_error_body(status, message, kind), status_code=status, headers=headers)
    await response(scope, receive, send)


class ApiKeyMiddleware:
    """Every request, on every path, must carry ``Authorization: Bearer KEY``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await _send_error(
                    send,
                    receive,
                    scope,
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Request bodies of at most ``limit`` bytes: a larger one gets 413 before the app sees it
    (by its Content-Length, or while it is read when it has none)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = (
            f"the request body is larger than this server's limit of {self.limit} bytes; send less "
            "(or start the server with a larger --max-body-bytes)"
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_error(send, receive, scope, 413, too_big, "invalid_request_error")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.limit:
                await _send_error(send, receive, scope, 413, too_big, "invalid_request_error")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    engine: Engine, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts and stops the model worker."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="peftlab serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    # the last added runs first: the key is checked before a body is read
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)  # type: ignore[arg-type]
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # type: ignore[arg-type]
    _add_error_handlers(app)
    _add_info_routes(app, engine)
    _add_adapter_routes(app, engine)
    _add_completion_routes(app, engine)
    _add_chat_routes(app, engine)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON body with the status it deserves."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(err)
        return JSONResponse(_error_body(status, message, "invalid_request_error"), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = (
            f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else err.detail
        )
        return JSONResponse(
            _error_body(err.status_code, str(message), kind), status_code=err.status_code, headers=err.headers
        )


def _add_info_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        body = {
            "status": "draining" if engine.draining else "ok",
            "model": engine.base_name,
            "adapters": list(engine.adapters),
            "batching": engine.batching,
            "queue_depth": engine.queue_depth(),
            "running": engine.running_rows,
            "max_batch_size": engine.max_batch_size,
            "stats": engine.stats.to_dict(),
        }
        # a load balancer stops sending here as soon as the server is shutting down
        return JSONResponse(body, status_code=503) if engine.draining else body

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data: list[dict[str, Any]] = [
            {"id": engine.base_name, "object": "model", "created": engine.created, "owned_by": "peftlab",
             "root": engine.base_name, "parent": None},
        ]  # fmt: skip
        for name, info in engine.adapters.items():
            data.append(
                {"id": name, "object": "model", "created": engine.created, "owned_by": "peftlab",
                 "root": engine.base_name, "parent": engine.base_name, "method": info["method"]}
            )  # fmt: skip
        return {"object": "list", "data": data}


def _add_adapter_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/adapters")
    async def load_adapter(req: AdapterRequest) -> dict[str, Any]:
        _checked_fields(req)
        return await engine.load_adapter(req.name, req.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await engine.unload_adapter(name)


def _add_completion_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> dict[str, Any] | Response:
        _checked_fields(req)
        _unsupported(req)
        adapter = engine.resolve(req.model)
        params = _sampling(req.max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ServeError(
                400, "prompt is an empty list; give a string or a list of strings", param="prompt"
            )
        if len(prompts) > engine.max_prompts:
            raise ServeError(
                400,
                f"{len(prompts)} prompts in one request; this server takes at most {engine.max_prompts}",
                param="prompt",
            )
        prompt_ids = [engine.encode(p) for p in prompts]
        engine.check_lengths(prompt_ids, params.max_tokens)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        job = engine.submit(adapter, prompt_ids, params, stream=req.stream, model=req.model)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(job, meta, include_usage, _text_choice)
        await _result(job, request)
        return {
            **meta,
            "choices": [
                {"text": r.text, "index": r.index, "logprobs": None, "finish_reason": r.finish_reason}
                for r in job.rows
            ],
            "usage": _usage(job),
        }


def _add_chat_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> dict[str, Any] | Response:
        _checked_fields(req)
        _chat_unsupported(req)
        if req.messages is None:
            raise ServeError(
                400, "messages: is missing; send a list of {role, content} objects", param="messages"
            )
        messages = parse_messages(req.messages)
        adapter = engine.resolve(req.model)
        ids = engine.encode(render_chat(engine.tokenizer, messages), special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            room = (engine.context_length or DEFAULT_CHAT_MAX_TOKENS + len(ids)) - len(ids)
            max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, engine.max_tokens_limit, room))
        params = _sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        engine.check_lengths([ids], params.max_tokens)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if req.stream else "chat.completion",
            "created": int(time.time()),
            "model": req.model,
        }
        job = engine.submit(adapter, [ids], params, stream=req.stream, model=req.model)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(job, meta, include_usage, _delta_choice())
        await _result(job, request)
        (row,) = job.rows
        return {
            **meta,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row.text},
                    "logprobs": None,
                    "finish_reason": row.finish_reason,
                }
            ],
            "usage": _usage(job),
        }


def _usage(job: Job) -> dict[str, int]:
    prompt = sum(len(r.prompt_ids) for r in job.rows)
    completion = sum(len(r.tokens) for r in job.rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body is read already, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result(job: Job, request: Request) -> None:
    """Wait for a whole (non-streamed) result; a client that leaves first frees its rows."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([job.future, gone], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        gone.cancel()
    if not job.future.done():
        job.cancel()  # nobody is left to answer
        raise ServeError(499, "the client closed the connection", kind="client_closed")
    job.future.result()  # a ServeError set by the worker


Choice = Callable[[StreamChunk], dict[str, Any]]


def _text_choice(event: StreamChunk) -> dict[str, Any]:
    return {"text": event.text, "index": event.index, "logprobs": None, "finish_reason": event.finish_reason}


def _delta_choice() -> Choice:
    """Chat chunks: each row's first delta names the assistant role, as OpenAI's do."""
    started: set[int] = set()

    def choice(event: StreamChunk) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": event.text}
        if event.index not in started:
            started.add(event.index)
            delta = {"role": "assistant", **delta}
        return {"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}

    return choice


async def _stream(job: Job, meta: dict[str, Any], include_usage: bool, choice: Choice) -> StreamingResponse:
    """Server-sent events; the first event is awaited here, so an error before any text (the
    adapter was unloaded meanwhile) is still an ordinary HTTP error."""
    assert job.events is not None
    events = job.events
    try:
        first = await events.get()
    except asyncio.CancelledError:
        job.cancel()
        raise
    if isinstance(first, ServeError):
        raise first

    def sse(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        finished = 0
        event: StreamChunk | ServeError = first
        try:
            while True:
                if isinstance(event, ServeError):
                    yield sse(_error_body(event.status, event.message, event.kind, event.param))
                    break
                yield sse({**meta, "choices": [choice(event)]})
                if event.finish_reason is not None:
                    finished += 1
                    if finished == len(job.rows):
                        if include_usage:
                            yield sse({**meta, "choices": [], "usage": _usage(job)})
                        break
                event = await events.get()
            yield b"data: [DONE]\n\n"
        finally:
            if finished < len(job.rows):
                job.cancel()  # the client left mid-stream: its rows leave at the next step

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class ServerThread:
    """uvicorn serving ``app`` on a background thread (tests, benchmarks, notebooks).

    ``port=0`` picks a free port; ``url`` is where it listens once ``start()`` returns.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="peftlab-uvicorn", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as err:  # reported by start()
            self.error = err

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
