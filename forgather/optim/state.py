"""What our optimizers share: the `Params` type, the checks of their arguments, the walk of a step, host numbers
to the device without a wait, the check of a state dict before it loads, and fp32 state across loading.

`torch.optim.Optimizer.load_state_dict` checks only the number of parameters in each group: the state of another
optimizer, or of other parameters as many, loads without a word and fails steps later on a missing key or a shape
(or, where a shape happens to broadcast, trains on garbage). `check_saved_state` compares every saved entry with
what the optimizer keeps for that parameter (`StateLayout`) and names the first that differs.

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

from forgather.models.checks import is_number

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# What an optimizer keeps for one parameter: the entries it needs, each with its shape (None: any, e.g. the step
# count), and the entries it may hold besides (their shapes unchecked). A StateLayout gives it for a parameter and
# its group.
Layout = tuple[dict[str, tuple[int, ...] | None], set[str]]
StateLayout = Callable[[torch.Tensor, dict[str, Any]], Layout]


def check_number(owner: str, name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Raise ValueError naming `owner(name=value)` and what to give, unless `value` is a number (not a bool) for
    which `ok` holds: in `__init__`, where torch's own optimizers check theirs, not as a NaN weight steps later."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not is_number(value) or not ok(value):
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


def adam_layout(param: torch.Tensor, group: dict[str, Any]) -> Layout:
    """AdamW's state (torch's, ours): a step count and two moments shaped like the parameter (amsgrad: a third)."""
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")
    return {"step": None, **{key: tuple(param.shape) for key in moments}}, set()


def check_saved_state(optimizer: Optimizer, state_dict: Any, layout: StateLayout) -> None:
    """Raise ValueError, before anything loads, where `state_dict` is not one this optimizer saved for these
    parameters: not an optimizer state dict, groups of other sizes, or a parameter's saved entries other than
    `layout` says (another optimizer's keys, or shapes of other parameters)."""
    owner = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{owner}.load_state_dict: got {found}, not an optimizer state dict ('state' and "
                         f"'param_groups'); give it what {owner}.state_dict() returned")
    saved_sizes = [len(group["params"]) for group in state_dict["param_groups"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise ValueError(f"{owner}.load_state_dict: the saved state has param groups of {saved_sizes} parameters, "
                         f"this optimizer {sizes}: it was saved for other parameters or another grouping of them; "
                         "build the optimizer over the parameters and groups it was saved with, or resume without "
                         "the optimizer state")
    index = 0
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        loaded_group = {**group, **{k: v for k, v in saved_group.items() if k != "params"}}  # as torch loads it
        for param_id, param in zip(saved_group["params"], group["params"]):
            entries = state_dict["state"].get(param_id) or {}
            problem = _layout_problem(entries, layout(param, loaded_group)) if entries else None
            if problem:
                raise ValueError(f"{owner}.load_state_dict: the saved state of parameter {index} (shape "
                                 f"{list(param.shape)}) {problem}: it was saved by another optimizer or for other "
                                 f"parameters; load it into the optimizer and model that saved it, or resume "
                                 f"without the optimizer state")
            index += 1


def _layout_problem(entries: dict[str, Any], layout: Layout) -> str | None:
    """What is wrong with one parameter's saved `entries`, in words; None if nothing."""
    needed, allowed = layout
    if set(entries) - set(needed) - allowed or set(needed) - set(entries):
        return f"holds {sorted(entries)}, where this optimizer keeps {sorted(needed)}"
    for key, shape in needed.items():
        value = entries[key]
        if shape is not None and (not torch.is_tensor(value) or tuple(value.shape) != shape):
            found = list(value.shape) if torch.is_tensor(value) else type(value).__name__
            return f"has {key} of shape {found}, where this parameter's is {list(shape)}"
    return None


def load_state_keeping_fp32(
    optimizer: Optimizer, state_dict: dict[str, Any], keys: set[str], load: Callable[[dict[str, Any]], None],
    layout: StateLayout,
) -> None:
    """`state_dict` checked against `layout` (check_saved_state), `load(state_dict)` (the base class's load), then
    the saved fp32 entries named in `keys`, unrounded."""
    check_saved_state(optimizer, state_dict, layout)
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
