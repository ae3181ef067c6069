"""The client side of `forgather inf client`: streaming completions and an interactive chat over httpx.

`Client(url, api_key)` talks to any OpenAI-compatible server; `stream_completion(prompt)` and
`stream_chat(messages)` yield text pieces as server-sent events arrive; `chat_loop()` reads user turns from
a stream of lines (the terminal), prints each reply as it streams, and keeps the conversation. Every failure
is a ClientError with a one-line message: the server's error (or the start of its page, tags dropped, when it
sends no OpenAI error body), that no server answers at the URL, or that what answers is no OpenAI-compatible
server.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any, Callable, Iterator, TextIO

import httpx


class ClientError(RuntimeError):
    """The server answered with an error body (the message is the server's), or no server answered."""


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """Turn httpx's transport errors (connection refused, unknown host, timeout) into one-line ClientErrors."""
    try:
        yield
    except httpx.ConnectError as error:
        raise ClientError(f"no server answers at {url} ({error}); start one with `forgather inf server -m "
                          f"MODEL_DIR`, or give its address with --url") from None
    except httpx.TimeoutException:
        raise ClientError(f"the server at {url} did not answer in time") from None
    except httpx.TransportError as error:
        raise ClientError(f"the connection to {url} failed: {type(error).__name__}: {error}") from None


def wait_for_server(url: str, alive: Callable[[], bool] = lambda: True, output: Callable[[], str] = lambda: "",
                    timeout: float = 90.0) -> None:
    """Return once the server at `url` answers /v1/models. ClientError, with `output()` (its log, say), when
    `alive()` turns false (the process that serves it exited) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise ClientError(f"the server for {url} exited: {output()}")
        try:
            httpx.get(f"{url}/v1/models", timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise ClientError(f"no server answers at {url} after {timeout:g} s: {output()}") from None
            time.sleep(0.2)


EXCERPT = 120  # characters of a page that is no OpenAI error body, quoted in the one-line error


def _excerpt(text: str) -> str:
    """The start of a page's text on one line: tags dropped, whitespace collapsed."""
    words = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    return words if len(words) <= EXCERPT else words[:EXCERPT] + "..."


def _not_openai(url: str, what: str) -> ClientError:
    return ClientError(f"the server at {url} did not answer as an OpenAI-compatible server ({what}); check --url")


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):  # not an OpenAI error body: an HTML page, a proxy's text, ...
        message = _excerpt(response.text) or response.reason_phrase
    raise ClientError(f"{response.status_code}: {message}")


def _events(response: httpx.Response, url: str) -> Iterator[dict]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        try:
            body = json.loads(data)
            error = body.get("error")
        except (ValueError, AttributeError):
            raise _not_openai(url, f"an event is not a JSON object: {_excerpt(data)!r}") from None
        if error is not None:
            raise ClientError(error["message"] if isinstance(error, dict) and "message" in error else str(error))
        yield body


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ClientError(f"{url!r} is not a server address; give one like http://127.0.0.1:8000")


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        _check_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout)
        self._model = model

    def models(self) -> list[str]:
        """The ids of the models the server serves."""
        with _reaching(self.url):
            response = self.http.get("/models")
        _raise_for_error(response)
        try:
            return [card["id"] for card in response.json()["data"]]
        except (ValueError, KeyError, TypeError):  # a web page, or JSON of another kind
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise _not_openai(self.url, f"GET /v1/models gave {response.status_code} {kind}: "
                                        f"{_excerpt(response.text)!r}") from None

    @property
    def model(self) -> str:
        """The model named at construction, else the first one the server lists."""
        if self._model is None:
            self._model = self.models()[0]
        return self._model

    def _stream(self, path: str, body: dict, piece: Callable[[dict], str]) -> Iterator[str]:
        body = {"model": self.model, "stream": True, **body}
        with _reaching(self.url), self.http.stream("POST", path, json=body) as response:
            _raise_for_error(response)
            for event in _events(response, self.url):
                if event.get("choices"):
                    yield piece(event["choices"][0])

    def stream_completion(self, prompt: str, **sampling: Any) -> Iterator[str]:
        return self._stream("/completions", {"prompt": prompt, **sampling}, lambda choice: choice.get("text", ""))

    def stream_chat(self, messages: list[dict], **sampling: Any) -> Iterator[str]:
        return self._stream("/chat/completions", {"messages": messages, **sampling},
                            lambda choice: choice.get("delta", {}).get("content") or "")


def print_stream(pieces: Iterator[str], out: TextIO) -> str:
    """Write the pieces as they arrive; return the whole text."""
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    out.write("\n")
    return "".join(text)


def chat_loop(client: Client, lines: TextIO, out: TextIO, system: str | None = None, prompt: str = "> ",
              **sampling: Any) -> None:
    """Chat until end of input or `/exit`; `/reset` forgets the conversation. A turn the server refuses
    (the conversation outgrew the context, say) is reported and dropped, and the chat goes on."""
    messages = [{"role": "system", "content": system}] if system else []
    history_start = len(messages)
    while True:
        out.write(prompt)
        out.flush()
        line = lines.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            del messages[history_start:]
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            reply = print_stream(client.stream_chat(messages, **sampling), out)
        except ClientError as error:
            out.write(f"error: {error}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
