"""Lightning parts for causal LMs: `CausalLMModule` (module.py) and `TextDataModule` (datamodule.py).

Names resolve lazily, so importing this package does not import torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"CausalLMModule": "module", "TextDataModule": "datamodule"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'forgather.lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"forgather.lightning.{_EXPORTS[name]}"), name)
