"""Where our Triton custom ops can run: the one lookup that the model's files make for them.

A model file that has a Triton version of its computation (norm.py: fused_rms_norm, attention.py: fused_rotary,
feedforward.py: fused_swiglu) asks `triton_ops(name)` when it is built, and keeps the torch expression where the
answer is None. The module is imported by name, not with an import statement, so that standalone exported code
(export.py inlines this file with the model's, and forgather is absent there) and CPU builds of torch without
Triton load and run the torch path.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def triton_ops(name: str) -> ModuleType | None:
    """forgather.models.NAME (a module of Triton custom ops), or None where it cannot run: without Triton, and
    where forgather is absent."""
    try:
        importlib.import_module("triton")
        return importlib.import_module(f"forgather.models.{name}")
    except ImportError:
        return None
