"""The FastAPI app: OpenAI-compatible routes over one Backend.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` answers with
server-sent events: `data: {chunk}` lines, then `data: [DONE]`). Generation runs on one worker thread, so
requests are served one at a time in arrival order (each with its own KV cache and random generator, so
outputs never mix) while the event loop keeps accepting connections. A streaming client that disconnects
stops its generation. Every error is an OpenAI error body with a 4xx (5xx only for server faults); an
`api_key` requires `Authorization: Bearer <key>` on every route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import protocol
from .backend import Backend, Delta, RequestError, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    where = ".".join(location)
    return (f"{where}: {first.get('msg')}" if where else first.get("msg", "invalid request")), where or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status)

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
        return JSONResponse(protocol.error_body(f"{type(error).__name__}: {error}", "server_error"), status_code=500)


def _key_check(api_key: str | None) -> Callable:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")

    return check


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class Generator:
    """Runs Backend.stream on the single worker thread and hands its Deltas to the event loop."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgather-generate")

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Delta:
        """The whole completion as one Delta (text joined; finish_reason and token count of the last)."""
        deltas = await asyncio.get_running_loop().run_in_executor(
            self.worker, lambda: list(self.backend.stream(prompt_ids, params)))
        return Delta("".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].completion_tokens)

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def work() -> None:
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
    app = FastAPI(title="Forgather inference server", dependencies=[Depends(_key_check(api_key))])
    _install_error_handlers(app)
    generator = Generator(backend)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           "invalid_request_error", param="model", code="model_not_found")

    def prompt_ids(prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return backend.encode(prompt)
        if all(isinstance(item, int) for item in prompt):
            if not all(0 <= item < backend.vocab_size for item in prompt):
                raise RequestError(f"token ids must lie in [0, {backend.vocab_size})", param="prompt")
            return list(prompt)
        if len(prompt) != 1:
            raise RequestError("send one prompt per request", param="prompt")
        return backend.encode(prompt[0])

    async def events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except Exception as error:  # headers are sent: report in the stream, as OpenAI does
            yield _sse(protocol.error_body(f"{type(error).__name__}: {error}", "server_error"))
        yield _sse("[DONE]")

    def streamed(request: protocol.SamplingFields, ids: list[int], params: SamplingParams,
                 chunk: Callable[[Delta], dict], first: dict | None = None) -> StreamingResponse:
        """The SSE response: `first` (if any), a chunk per Delta, and with `stream_options.include_usage` a
        last chunk with no choices and the usage, as OpenAI sends it."""
        async def chunks() -> AsyncIterator[dict]:
            if first is not None:
                yield first
            last = None
            async for last in generator.stream(ids, params):
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
    async def completions(request: protocol.CompletionRequest):
        check_model(request.model)
        ids = prompt_ids(request.prompt)
        params = _params(request, backend.check_budget(len(ids), request.max_tokens))
        id_ = protocol.new_id("cmpl")
        if request.stream:
            return streamed(request, ids, params,
                            lambda d: protocol.completion_body(id_, model_name, d.text, d.finish_reason))
        done = await generator.complete(ids, params)
        body = protocol.completion_body(id_, model_name, done.text, done.finish_reason)
        return {**body, "usage": protocol.usage(len(ids), done.completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: protocol.ChatRequest):
        check_model(request.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        ids = backend.chat_prompt(messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = _params(request, backend.check_budget(len(ids), max_tokens), backend.chat_stop)
        id_ = protocol.new_id("chatcmpl")
        if request.stream:
            first = protocol.chat_chunk(id_, model_name, {"role": "assistant", "content": ""}, None)
            return streamed(request, ids, params, lambda d: protocol.chat_chunk(
                id_, model_name, {"content": d.text} if d.text else {}, d.finish_reason), first)
        done = await generator.complete(ids, params)
        body = protocol.chat_body(id_, model_name, done.text, done.finish_reason)
        return {**body, "usage": protocol.usage(len(ids), done.completion_tokens)}

    return app
