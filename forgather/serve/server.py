"""Run the inference server: load a Backend, build the app, serve it with uvicorn (loopback by default)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


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
) -> None:
    import uvicorn

    from .app import create_app
    from .backend import Backend

    if api_key is None and not is_loopback(host):
        print(f"warning: serving on {host} without --api-key: anyone who reaches it can use the model",
              file=sys.stderr)
    backend = Backend.load(model_dir, device_map, dtype, compile, context_length)
    name = model_name or Path(model_dir).resolve().name
    uvicorn.run(create_app(backend, name, api_key), host=host, port=port, log_level=log_level)
