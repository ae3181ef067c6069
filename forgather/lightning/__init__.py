"""Lightning parts for causal LMs: `CausalLMModule` (module.py), `TextDataModule` (datamodule.py) and a
`ProgressBar` that does not make the host wait for the GPU every step (progress.py); `quiet_lightning()`
(quiet.py) silences two notices Lightning prints on every run.

Names resolve lazily, so importing this package does not import torch or Lightning.
"""

from __future__ import annotations

from forgather.lazy import lazy_exports

_EXPORTS = {"CausalLMModule": "module", "TextDataModule": "datamodule", "ProgressBar": "progress"}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
