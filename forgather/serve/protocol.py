"""The OpenAI API's wire format: request bodies (validated by pydantic), response, chunk and error bodies.

Requests accept the fields this server honours -- model, prompt / messages, max_tokens (chat also
max_completion_tokens), temperature, top_p, stop, seed, stream, stream_options.include_usage -- and
ignore other OpenAI fields. One completion per request (`n` = 1). Errors are `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="one completion per request")

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stop if s)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.get("type") for part in self.content}
        if kinds - {"text"}:
            raise ValueError(f"only text content parts are supported, not {sorted(k for k in kinds if k != 'text')}")
        return "".join(part.get("text", "") for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(id_: str, model: str, text: str, finish_reason: str | None) -> dict:
    """A text completion, or one streamed piece of it (the same shape)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


def chat_body(id_: str, model: str, text: str, finish_reason: str | None) -> dict:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice]}


def chat_chunk(id_: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}
