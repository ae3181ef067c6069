"""What our optimizers share: the `Params` type, the checks of their arguments, the walk of a step, host numbers
to the device without a wait, and fp32 state across loading.

`torch.optim.Optimizer.load_state_dict` casts every floating state tensor to its parameter's dtype. Our
optimizers keep some state in fp32 whatever the parameter dtype; for bf16 parameters that cast would round it
to bf16 and a resumed run would no longer follow the uninterrupted one. `load_state_keeping_fp32` loads the
rest through torch and puts the saved fp32 tensors back as they were.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.optim import Optimizer

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def check_number(owner: str, name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Raise ValueError naming `owner(name=value)` and what to give, unless `value` is a number (not a bool) for
    which `ok` holds: in `__init__`, where torch's own optimizers check theirs, not as a NaN weight steps later."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{owner}({name}={value!r}): {name} takes {expected}")


def check_adam_arguments(owner: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """torch.optim.AdamW's checks, each naming the argument, its value and what to give."""
    check_number(owner, "lr", lr, lambda x: x >= 0, "a number >= 0, e.g. 1e-3")
    pair = isinstance(betas, (tuple, list)) and len(betas) == 2
    if not pair or not all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{owner}(betas={betas!r}): betas takes two numbers in [0, 1), e.g. (0.9, 0.999)")
    check_number(owner, "eps", eps, lambda x: x >= 0, "a number >= 0, e.g. 1e-8")
    check_number(owner, "weight_decay", weight_decay, lambda x: x >= 0, "a number >= 0, e.g. 0.01")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: copied from pinned memory, asynchronously (the
    caching host allocator does not hand the pinned block out again before the copy has run). Elsewhere than
    CUDA (the CPU, Triton's interpreter) the tensor as it is."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss of `closure` (forward + backward) run with gradients on, as `step(closure)` promises; else None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def parameters_with_grads(
    optimizer: Optimizer, dense_only: str | None = None
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(group, parameter) for every parameter holding a gradient; with `dense_only` (the optimizer's name) a
    sparse gradient raises."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if dense_only and param.grad.is_sparse:
                raise RuntimeError(f"{dense_only} does not support sparse gradients")
            yield group, param


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
