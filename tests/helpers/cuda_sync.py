"""`sync_is_an_error()`: inside it, any operation that makes the host wait for the GPU raises (CUDA only)."""

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def sync_is_an_error() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
