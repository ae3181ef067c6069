"""AdamW for pure-bf16 training: the step in fp32, bf16 parameters written with stochastic rounding.

`torch.optim.AdamW` on bf16 parameters rounds every updated weight to the nearest bf16 value; updates below
half a bf16 step are lost and larger ones are off by up to half a step, and the loss pays for it (the
tutorial on a GPU: 4.958 in pure bf16 vs 4.881 with fp32 master weights, docs/benchmarks.md "Precision").
This AdamW computes each step in fp32 and writes bf16 parameters with forgather/optim/rounding.py's stochastic
rounding, which keeps every update in expectation, with no master copy. The moments live in the parameter's
dtype as torch's do (`state_dtype=torch.float32` keeps them in fp32, 4 more bytes per parameter).

Per parameter the whole update is one function, compiled on CUDA (inductor fuses the fp32 math, the moment
updates and the rounding hash into one kernel per shape; CPU runs it eagerly). Numbers that change every step
(lr from a scheduler, bias corrections, the rounding seed) reach it as one small device tensor, copied from
pinned memory so the host never waits, and a new lr never means a recompilation.

Sharded parameters (DTensor, FSDP2 / ModelParallelStrategy) are updated shard by shard: the update is
elementwise, so each rank steps its local shard (the rounding index is the element's position in the shard).

Math (Loshchilov & Hutter, torch.optim.AdamW's): m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
x <- x (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from forgather.optim.rounding import step_seed, stochastic_round_to_bf16
from forgather.optim.state import (
    Params, adam_layout, check_adam_arguments, load_state_keeping_fp32, parameters_with_grads, run_closure, to_device,
)


def adamw_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    scalars: torch.Tensor, seed: torch.Tensor, stochastic: bool,
) -> None:
    """One parameter's step; `scalars` = [1 - b1, b2, 1 - b2, eps, 1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t)]."""
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt = scalars.unbind()
    g = grad.float()
    m = exp_avg.float().lerp(g, one_minus_beta1)
    v = exp_avg_sq.float() * beta2 + one_minus_beta2 * g * g
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    x = param.float() * decay - step_size * m / (v.sqrt() / bias2_sqrt + eps)
    param.copy_(stochastic_round_to_bf16(x, seed) if stochastic else x)


@functools.cache
def _compiled_update() -> Callable[..., None]:
    return torch.compile(adamw_update, dynamic=None)


def _update_fn(device: torch.device) -> Callable[..., None]:
    return _compiled_update() if device.type == "cuda" else adamw_update


class AdamW(Optimizer):
    """AdamW with fp32 math and stochastic rounding of bf16 parameters (see the module docstring)."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stochastic_rounding: bool = True,
        seed: int = 0,
        state_dtype: torch.dtype | None = None,
    ):
        check_adam_arguments("AdamW", lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding, seed=seed)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype

    def __getstate__(self) -> dict[str, Any]:  # torch pickles defaults, state and groups only
        return {**super().__getstate__(), "state_dtype": self.state_dtype}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        for group, param in parameters_with_grads(self, dense_only="AdamW"):
            beta1, beta2 = group["betas"]
            state = self.state[param]
            if not state:
                dtype = self.state_dtype or param.dtype
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"]
            numbers = [1 - beta1, beta2, 1 - beta2, group["eps"], 1 - group["lr"] * group["weight_decay"],
                       group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step)]
            scalars = to_device(torch.tensor(numbers, dtype=torch.float32), param.device)
            seed = to_device(torch.tensor(step_seed(group["seed"], step), dtype=torch.int64), param.device)
            stochastic = group["stochastic_rounding"] and param.dtype == torch.bfloat16
            tensors = [_local(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
            _update_fn(param.device)(*tensors, scalars, seed, stochastic)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Our state dict, or torch's AdamW's (TritonAdamW's, CompiledAdamW's): the same moments; the options torch
        lacks come from this optimizer's arguments, its step counts (tensors there) become ints."""
        keys = {"exp_avg", "exp_avg_sq"} if self.state_dtype == torch.float32 else set()
        load_state_keeping_fp32(self, state_dict, keys, super().load_state_dict, adam_layout)
        for group in self.param_groups:
            for key in ("stochastic_rounding", "seed"):
                group.setdefault(key, self.defaults[key])
        for state in self.state.values():
            if torch.is_tensor(state["step"]):
                state["step"] = int(state["step"].item())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (updated in place, it is the DTensor's data); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

