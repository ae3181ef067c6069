"""What the Triton kernels of forgather (optim/adafactor_kernels.py, serve/decode_kernels.py) share."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels (TRITON_INTERPRET=1): then they take CPU tensors (the CPU
    tests run the kernels' code this way)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
