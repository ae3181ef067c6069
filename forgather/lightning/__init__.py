"""Lightning parts for causal LMs: `CausalLMModule` (module.py) and `TextDataModule` (datamodule.py).

Names resolve lazily, so importing this package does not import torch or Lightning.
"""

from __future__ import annotations

from forgather.lazy import lazy_exports

_EXPORTS = {"CausalLMModule": "module", "TextDataModule": "datamodule"}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
