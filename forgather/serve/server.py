"""Run the inference server: load a Backend, build the app, serve it with uvicorn (loopback by default).

A host other than loopback (`0.0.0.0`, a LAN address, a host name) is refused without an API key, since anyone
who reaches the port could use the model; `insecure=True` says the network is trusted and lifts the rule.
Both checks, and binding the port, come before the model loads, so a mistake costs no loading time.
At shutdown (SIGTERM, Ctrl-C) the backend stops first: every completion still running or queued ends at once
with a 503 error (in a stream: an error event, then `[DONE]`), so uvicorn, which waits for open responses to
end, exits promptly instead of decoding every stream to its max_tokens.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

LOOPBACK_NAMES = ("localhost",)
SWITCH_INTERVAL = 0.0005  # seconds: how long the engine's thread waits at most for the GIL (see serve)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """ValueError for an empty key, and for a non-loopback `host` without a key unless `insecure`."""
    if api_key == "":
        raise ValueError("the API key is empty (--api-key or FORGATHER_API_KEY); give a key, or none on loopback")
    if api_key is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"--host {host} would let anyone who reaches it use the model; add --api-key KEY (or set "
            f"FORGATHER_API_KEY), or pass --insecure on a trusted network")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (what uvicorn would bind); ValueError when that is impossible."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or "
                         f"--host, or stop what listens there") from None
    return sock


def stopping_server(config: Any, backend: Any) -> Any:
    """A uvicorn.Server of `config` that closes `backend` (Backend.close) when it starts to shut down, before it
    waits for the open connections: their completions end then, with an error saying why."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            await asyncio.to_thread(backend.close)  # the engine's thread finishes its step: not on the event loop
            await super().shutdown(sockets)

    return Server(config)


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device_map: str | None = None,
    dtype: str = "auto",
    compile: bool = False,
    api_key: str | None = None,
    model_name: str | None = None,
    context_length: int | None = None,
    log_level: str = "info",
    insecure: bool = False,
    engine: bool = False,
    max_num_seqs: int = 16,
    switch_interval: float = SWITCH_INTERVAL,
    http: str = "auto",
    chat_template: str | None = None,
    stop_strings: tuple[str, ...] = (),
) -> None:
    """Serve until stopped. With the engine, Python's GIL passes between the engine's thread and the event loop
    every `switch_interval` seconds at most (sys.setswitchinterval, restored on return). `http` is uvicorn's
    HTTP implementation: "auto" takes httptools (C; the `serve` extra installs it) where installed, else
    h11 (pure Python, more of the event loop's time per streamed chunk). `chat_template` (Jinja text) replaces
    the tokenizer's; `stop_strings` end every request's text."""
    import uvicorn

    from .app import create_app
    from .backend import Backend

    check_exposure(host, api_key, insecure)
    with listen(host, port) as sock:
        backend = Backend.load(model_dir, device_map, dtype, compile, context_length, engine=engine,
                               max_num_seqs=max_num_seqs, chat_template=chat_template, stop_strings=stop_strings)
        name = model_name or Path(model_dir).resolve().name
        app = create_app(backend, name, api_key)
        # What is loaded by now (the model, compiled graphs, libraries) lives as long as the server: frozen out
        # of the collector's sight, so that a full collection, which walks every tracked object (millions,
        # after compiling), cannot stall the token streams; objects made later are collected as before.
        gc.collect()
        gc.freeze()
        where = f"[{host}]" if ":" in host else host
        # uvicorn announces its address only for sockets it binds itself
        print(f"serving {name!r} at http://{where}:{sock.getsockname()[1]}/v1 (CTRL+C to stop)", file=sys.stderr)
        server = stopping_server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http), backend)
        if backend.engine is None:
            server.run(sockets=[sock])
            return
        # The engine's thread waits for the GPU without the GIL, then needs it to hand out the step's tokens and
        # launch the next step; while the event loop is busy streaming, Python hands it over only after the
        # switch interval, 5 ms by default: steps of ~1.3 ms then come up to 5 ms late (a stand-in engine's p99
        # step 4.1-5.5 ms against 2.9-3.1 at 0.5 ms, scripts/bench_http_stack.py; on an H200 with h11, 32
        # streams' p99 gap 5.14 ms against 6.73 and 1.16x the tokens/s; with httptools 2.78 against 3.06 ms,
        # for 0.91x the tokens/s: docs/benchmarks.md).
        default = sys.getswitchinterval()
        sys.setswitchinterval(switch_interval)
        try:
            server.run(sockets=[sock])
        finally:
            sys.setswitchinterval(default)

