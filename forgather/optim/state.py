"""What our optimizers share about parameters and state: the `Params` type and fp32 state after loading.

`torch.optim.Optimizer.load_state_dict` casts every floating state tensor to its parameter's dtype; our
optimizers keep some state in fp32 whatever the parameter dtype, and `restore_fp32_state` puts it back.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def restore_fp32_state(optimizer: Optimizer, keys: set[str]) -> None:
    """Cast the state entries named in `keys` back to fp32 (call after `load_state_dict`)."""
    for state in optimizer.state.values():
        for key in keys & state.keys():
            state[key] = state[key].float()
