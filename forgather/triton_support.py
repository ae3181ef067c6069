"""What the Triton kernels of forgather (optim/adafactor_kernels.py, serve/decode_kernels.py) share."""

from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels (TRITON_INTERPRET=1): then they take CPU tensors (the CPU
    tests run the kernels' code this way)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs(device, least: tuple[int, int] = (7, 0)) -> bool:
    """Whether our Triton kernels run on `device`: a CUDA GPU of compute capability `least` or later (Triton's
    own least is 7.0) where triton is installed. Not the interpreter's business: its tensors are the CPU's."""
    return getattr(device, "type", device) == "cuda" and _triton_runs(str(device), least)


@functools.cache
def _triton_runs(device: str, least: tuple[int, int]) -> bool:  # asked every decode step: looked up once
    import importlib.util

    import torch

    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= least


def pdl_supported(device) -> bool:
    """Whether kernels on `device` can use programmatic dependent launch (PDL): a kernel launched while the
    one before it in the stream still runs, waiting (griddepcontrol.wait) only before it reads that kernel's
    outputs. It needs compute capability 9.0 (Hopper) or later and a Triton whose launcher takes
    `launch_pdl` and that has `gdc_wait`; never under the interpreter."""
    import torch

    if interpreting() or getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
