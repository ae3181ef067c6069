"""The FastAPI app: OpenAI-compatible routes over one Backend.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` answers with
server-sent events: `data: {chunk}` lines, then `data: [DONE]`). With the backend's engine, requests are
batched: the engine's thread decodes every running request at once and hands each its tokens, which the
event loop turns into text (`text.TextStream`); a request beyond the engine's slots and its queue's bound
is a 429. Without it, generation runs on one worker thread, one request at a time in arrival order (each
with its own KV cache and random generator, so outputs never mix), while the event loop keeps accepting
connections. A client that disconnects, streaming or not, stops its generation and frees its slot (and a
queued request whose client left never starts). Prompts are encoded, and chat templates rendered, on a
worker thread (asyncio.to_thread), so that a long prompt does not stall the other requests' streams. Every
error is an OpenAI error body with a 4xx (5xx only for server faults).

With an `api_key`, every HTTP request -- the API, /docs, /redoc, /openapi.json and unknown paths alike --
needs `Authorization: Bearer <key>`; the check is ASGI middleware in front of all routing, so no route can
be added without it, and it compares digests in constant time (hmac.compare_digest).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import protocol
from .backend import Backend, Delta, RequestError, SamplingParams
from .scheduler import EngineStopped, QueueFull

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


_FIELD_NAMES = frozenset(name for model in (protocol.CompletionRequest, protocol.ChatRequest, protocol.ChatMessage,
                                            protocol.ContentPart, protocol.StreamOptions)
                         for name in model.model_fields)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The message and param of the error to report. A union (a prompt is a string or a list) gives one error
    per alternative: an error about the value itself says more than any "should be a list", and when every
    alternative refused the value's type, the field's accepted shapes are the message."""
    errors = error.errors()
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    # Union members add their type to the location (prompt.function-after[...]): keep field names and indices.
    names = [part for part in first.get("loc", ()) if isinstance(part, int) or part in _FIELD_NAMES]
    if not names:
        return "the request body must be a JSON object with the request's fields", None
    where, field = ".".join(map(str, names)), next(str(p) for p in reversed(names) if isinstance(p, str))
    message = first.get("msg", "invalid request")
    if len(errors) > 1 and first.get("type", "").endswith("_type") and field in protocol.SHAPES:
        message = f"should be {protocol.SHAPES[field]}"
    given = json.dumps(first.get("input")) if isinstance(first.get("input"), (str, int, float, bool)) else ""
    if first.get("type") not in ("lone_surrogate", "unsupported_field", "one_completion") and 0 < len(given) <= 40:
        message += f", not {given}"
    return f"{where}: {message}", where


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(EngineStopped)  # shutting down, or the engine failed: at submit, or before a response
    async def stopped(request: Request, error: EngineStopped) -> JSONResponse:
        return JSONResponse(_stopped_body(error), status_code=503)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(protocol.error_body(str(error), param=error.param, code=error.code), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(protocol.error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(protocol.error_body(message), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(_server_error_body(error), status_code=500)


def _server_error_body(error: Exception) -> dict:
    return protocol.error_body(f"{type(error).__name__}: {error} (a fault of the server, not of the request: the "
                               f"server's log has the traceback)", "server_error")


def _stopped_body(error: EngineStopped) -> dict:
    return protocol.error_body(str(error), "server_error", code="service_unavailable")


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header is `Bearer <api_key>` (the scheme is case-insensitive, RFC 7235).
    Digests are compared, so the time taken tells neither the key's length nor how much of it matched."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    same = hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                               hashlib.sha256(api_key.encode()).digest())
    return same and scheme.lower() == "bearer"


class RequireKey:
    """ASGI middleware: answer 401 to any HTTP request without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not bearer_matches(Headers(scope=scope).get("authorization"), self.api_key):
            body = protocol.error_body("missing or wrong API key (send Authorization: Bearer <key>)",
                                       "authentication_error", code="invalid_api_key")
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away. The body is read by then, so the server's next message is
    `http.disconnect` (sent when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class Mailbox:
    """Hands items from the engine's thread to queues of one event loop, waking the loop once per batch.

    `loop.call_soon_threadsafe` writes to the loop's wake-up pipe on every call; an engine step delivers a
    token to each of its running requests, so posting them one by one costs a system call and a loop
    wake-up per token. Here the items collect under a lock and one scheduled `flush` hands over all that
    arrived before it runs, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        if self.loop.is_closed():  # the engine then stops the request: nobody reads it any more
            raise RuntimeError("the event loop is closed")
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, item in pending:
            queue.put_nowait(item)


class Generator:
    """Runs completions on the backend's engine, or Backend.stream on the single worker thread, and hands
    their Deltas to the event loop."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgather-generate")
        self.mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request: Request) -> Delta:
        """The whole completion as one Delta (text joined; finish_reason and token count of the last).
        If the client of `request` goes away first, generation stops, as a stream's does, and this raises."""
        collecting = asyncio.ensure_future(self._collect(prompt_ids, params))
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            collecting.cancel()  # no-op when done; else the stream's `finally` stops the worker
        if not collecting.done() or collecting.cancelled():
            raise APIError(499, "the client closed the connection", "client_closed")
        deltas = collecting.result()
        return Delta("".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].completion_tokens)

    async def _collect(self, prompt_ids: list[int], params: SamplingParams) -> list[Delta]:
        return [delta async for delta in self.stream(prompt_ids, params)]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """The completion's Deltas. With the engine the request is queued now: a full queue raises a 429
        here, before any response starts."""
        engine = self.backend.engine
        if engine is None:
            return self._worker_stream(prompt_ids, params)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = self.mailboxes.get(loop) or self.mailboxes.setdefault(loop, Mailbox(loop))
        try:
            request = engine.submit(prompt_ids, params, lambda item: mailbox.post(queue, item))
        except QueueFull as error:
            raise APIError(429, str(error), "requests", code="rate_limit_exceeded") from None
        return self._engine_stream(request, queue, params)

    async def _engine_stream(self, request, queue: asyncio.Queue, params: SamplingParams) -> AsyncIterator[Delta]:
        text = self.backend.text_stream(params)
        try:
            while True:
                # Tokens that arrived while the client was being served go out as one chunk: under load, the
                # per-chunk work (JSON, SSE, the socket) is paid once per batch of tokens, not per token.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                pieces = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    delta = text.finish(item) if isinstance(item, str) else text.push(item)
                    if delta is not None:
                        pieces.append(delta)
                        if delta.finish_reason is not None:  # the engine's finish reason, or a stop string
                            break
                if pieces:
                    yield Delta("".join(d.text for d in pieces), pieces[-1].finish_reason,
                                pieces[-1].completion_tokens)
                    if pieces[-1].finish_reason is not None:
                        return
        finally:
            self.backend.engine.cancel(request)  # the client left, or a stop string ended it: free the slot

    async def _worker_stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def work() -> None:
            if cancelled.is_set():  # the client left while the request was queued
                loop.call_soon_threadsafe(queue.put_nowait, None)
                return
            try:
                for delta in self.backend.stream(prompt_ids, params, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except Exception as error:  # handed to the response, which reports it in the stream
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        loop.run_in_executor(self.worker, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancelled.set()  # the client went away (or we finished): stop generating for it


def _params(request: protocol.SamplingFields, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens, request.temperature, request.top_p, request.stop_strings() + extra_stop,
                          request.seed)


def create_app(backend: Backend, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving `backend` under the model id `model_name`."""
    app = FastAPI(title="Forgather inference server")
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    _install_error_handlers(app)
    generator = Generator(backend)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", param="model", code="model_not_found")

    def prompt_ids(prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return backend.encode_prompt(prompt)
        if all(isinstance(item, int) for item in prompt):
            if not all(0 <= item < backend.vocab_size for item in prompt):
                raise RequestError(f"token ids must lie in [0, {backend.vocab_size})", param="prompt")
            return list(prompt)
        if len(prompt) != 1:
            raise RequestError("send one prompt per request", param="prompt")
        return backend.encode_prompt(prompt[0])

    async def events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except EngineStopped as error:  # headers are sent: report in the stream, as OpenAI does
            yield _sse(_stopped_body(error))
        except Exception as error:  # uvicorn logs the errors of responses it sees fail; this one it does not
            log.error("a streamed completion failed", exc_info=error)
            yield _sse(_server_error_body(error))
        yield _sse("[DONE]")

    def streamed(request: protocol.SamplingFields, ids: list[int], params: SamplingParams,
                 chunk: Callable[[Delta], dict], first: dict | None = None) -> StreamingResponse:
        """The SSE response: `first` (if any), a chunk per Delta, and with `stream_options.include_usage` a
        last chunk with no choices and the usage, as OpenAI sends it."""
        deltas = generator.stream(ids, params)

        async def chunks() -> AsyncIterator[dict]:
            if first is not None:
                yield first
            last = None
            async for last in deltas:
                yield chunk(last)
            if request.include_usage() and last is not None:
                yield {**chunk(last), "choices": [], "usage": protocol.usage(len(ids), last.completion_tokens)}

        return StreamingResponse(events(chunks()), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "forgather",
                "max_model_len": backend.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: protocol.CompletionRequest, http: Request):
        check_model(request.model)
        ids = await asyncio.to_thread(prompt_ids, request.prompt)  # a long prompt must not stall other streams
        params = _params(request, backend.check_budget(len(ids), request.max_tokens, "prompt"),
                         backend.stop_strings)
        id_ = protocol.new_id("cmpl")
        if request.stream:
            return streamed(request, ids, params,
                            lambda d: protocol.completion_body(id_, model_name, d.text, d.finish_reason))
        done = await generator.complete(ids, params, http)
        body = protocol.completion_body(id_, model_name, done.text, done.finish_reason)
        return {**body, "usage": protocol.usage(len(ids), done.completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: protocol.ChatRequest, http: Request):
        check_model(request.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        ids = await asyncio.to_thread(backend.chat_prompt, messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = _params(request, backend.check_budget(len(ids), max_tokens, "messages"),
                         backend.chat_stop + backend.stop_strings)
        id_ = protocol.new_id("chatcmpl")
        if request.stream:
            first = protocol.chat_chunk(id_, model_name, {"role": "assistant", "content": ""}, None)
            return streamed(request, ids, params, lambda d: protocol.chat_chunk(
                id_, model_name, {"content": d.text} if d.text else {}, d.finish_reason), first)
        done = await generator.complete(ids, params, http)
        body = protocol.chat_body(id_, model_name, done.text, done.finish_reason)
        return {**body, "usage": protocol.usage(len(ids), done.completion_tokens)}

    return app
