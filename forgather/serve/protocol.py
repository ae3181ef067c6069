"""The OpenAI API's wire format: request bodies (validated by pydantic), response, chunk and error bodies.

Requests accept the fields this server honours -- model, prompt / messages, max_tokens (chat also
max_completion_tokens), temperature, top_p, stop, seed, stream, stream_options.include_usage. An OpenAI field
that would change the answer and that this server does not implement (logprobs, echo, best_of, suffix,
logit_bias, penalties, tools, response_format ...; `UNSUPPORTED`) is refused with a 400 naming it when it asks
for anything but its default, rather than ignored: the client would otherwise take an answer that silently
lacks what it asked for. Other fields (user, metadata ...) are ignored. One completion per request (`n` = 1).
Errors are `{"error": {"message", "type", "param", "code"}}`.

Validation is strict, as the OpenAI API's: `"stream": "yes"` or `"max_tokens": "5"` is a 400, not a silent
coercion (an int is still a valid float). Every text field must be Unicode text: JSON's `\\ud800` escape
decodes to a lone surrogate, which no tokenizer can encode, so it is refused here with the field's name.
`seed` must fit torch's generator seed (a 64-bit integer). `stop` holds at most 16 strings of at most 256
characters each.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(extra="ignore", strict=True)
# What the fields that accept several shapes accept, for the error when a value has none of them.
SHAPES = {"prompt": "a string, a list of one string, or a list of token ids", "stop": "a string or a list of strings",
          "content": "a string, a list of text parts, or null"}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_STOP_SEQUENCES, MAX_STOP_LENGTH = 16, 256  # a request's stop strings, and characters in each


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError(
            "lone_surrogate", "contains a lone surrogate ({code} at character {index}), which is not Unicode text; "
            "send valid UTF-8", {"code": f"U+{ord(text[error.start]):04X}", "index": error.start}) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _bounded_stop(stop: str | list[str] | None) -> str | list[str] | None:
    """Each token of a completion is checked against every stop string (text.TextStream), on the event loop:
    their number and length are bounded, as OpenAI's API bounds them (4 sequences there)."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_SEQUENCES:
        raise PydanticCustomError("too_many_stop_sequences", "{count} stop sequences; send at most {most}",
                                  {"count": len(stops), "most": MAX_STOP_SEQUENCES})
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_LENGTH:
        raise PydanticCustomError("stop_sequence_too_long", "a stop sequence of {length} characters; each may have "
                                  "at most {most}", {"length": longest, "most": MAX_STOP_LENGTH})
    return stop


def _one_completion(n: int | None) -> int | None:
    if n not in (None, 1):
        raise PydanticCustomError("one_completion", "{n} completions asked for; this server returns one per request "
                                  "(n = 1): send one request per completion", {"n": n})
    return n


def _unsupported(is_default: Callable[[Any], bool], what: str, todo: str = "leave the field out") -> Any:
    """An OpenAI field this server does not implement: its default value (or leaving it out) passes, anything
    else is a 400 saying what it asked for and what to do (the app names the field)."""
    def check(value: Any) -> Any:
        if not is_default(value):
            raise PydanticCustomError("unsupported_field", f"asks for {what}, which this server does not do; {todo}")
        return value

    return Annotated[Any, AfterValidator(check)]


def _absent(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _zero(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


# Each field's default passes; a value asking for what the server does not do is refused (module docstring).
UNSUPPORTED = {
    "logprobs": _unsupported(lambda v: v is None or v is False, "log probabilities"),
    "top_logprobs": _unsupported(_zero, "log probabilities"),
    "logit_bias": _unsupported(_absent, "biased token scores"),
    "presence_penalty": _unsupported(_zero, "a presence penalty"),
    "frequency_penalty": _unsupported(_zero, "a frequency penalty"),
    "echo": _unsupported(_absent, "the prompt echoed in the text", "leave the field out and prepend the prompt "
                         "yourself"),
    "suffix": _unsupported(_absent, "an insertion before a suffix"),
    "best_of": _unsupported(lambda v: v is None or (type(v) is int and v == 1), "the best of several completions",
                            "leave the field out, or send several requests"),
    "tools": _unsupported(_absent, "tool calls"),
    "functions": _unsupported(_absent, "function calls"),
    "tool_choice": _unsupported(lambda v: v in (None, "none", "auto"), "a tool call"),
    "function_call": _unsupported(lambda v: v in (None, "none", "auto"), "a function call"),
    "response_format": _unsupported(lambda v: v is None or v == {"type": "text"}, "a format other than text"),
}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = STRICT

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Annotated[Text | list[Text] | None, AfterValidator(_bounded_stop)] = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, AfterValidator(_one_completion)] = 1
    logprobs: UNSUPPORTED["logprobs"] = None
    logit_bias: UNSUPPORTED["logit_bias"] = None
    presence_penalty: UNSUPPORTED["presence_penalty"] = None
    frequency_penalty: UNSUPPORTED["frequency_penalty"] = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stop if s)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: UNSUPPORTED["echo"] = None
    suffix: UNSUPPORTED["suffix"] = None
    best_of: UNSUPPORTED["best_of"] = None


class ContentPart(BaseModel):
    model_config = STRICT

    type: str
    text: Text = ""


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"only text content parts are supported, not {sorted(kinds)}")
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: UNSUPPORTED["top_logprobs"] = None
    tools: UNSUPPORTED["tools"] = None
    functions: UNSUPPORTED["functions"] = None
    tool_choice: UNSUPPORTED["tool_choice"] = None
    function_call: UNSUPPORTED["function_call"] = None
    response_format: UNSUPPORTED["response_format"] = None


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
