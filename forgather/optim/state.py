"""What our optimizers share about parameters and state: the `Params` type and fp32 state across loading.

`torch.optim.Optimizer.load_state_dict` casts every floating state tensor to its parameter's dtype. Our
optimizers keep some state in fp32 whatever the parameter dtype; for bf16 parameters that cast would round it
to bf16 and a resumed run would no longer follow the uninterrupted one. `load_state_keeping_fp32` loads the
rest through torch and puts the saved fp32 tensors back as they were.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def load_state_keeping_fp32(
    optimizer: Optimizer, state_dict: dict[str, Any], keys: set[str], load: Callable[[dict[str, Any]], None]
) -> None:
    """`load(state_dict)` (the base class's load), then the saved fp32 entries named in `keys`, unrounded."""
    kept = {
        param_id: {key: value for key, value in entries.items() if key in keys and torch.is_tensor(value)}
        for param_id, entries in state_dict["state"].items()
    }
    load(state_dict)
    saved_ids = itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"])
    params = itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups)
    for param_id, param in zip(saved_ids, params):
        for key, value in kept.get(param_id, {}).items():
            optimizer.state[param][key] = value.to(device=param.device, dtype=torch.float32)
