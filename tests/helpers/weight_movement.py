"""How much of an fp32 run's weight movement a low-precision run keeps: the measure of the stochastic-rounding
tests (tests/test_optim_*.py, tests/gpu/test_optim_gpu.py)."""

import contextlib
from typing import Callable, ContextManager

import torch


def movement(
    init: torch.Tensor, grads: list[torch.Tensor], dtype: torch.dtype,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    later_steps: Callable[[], ContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """How far `make_optimizer([param])` moves a `dtype` copy of `init`, one step per gradient, in fp32.
    Steps after the first (which may compile) run inside `later_steps()`."""
    param = init.clone().to(dtype).requires_grad_()
    optimizer = make_optimizer([param])
    for index, grad in enumerate(grads):
        param.grad = grad.to(dtype)
        with later_steps() if index else contextlib.nullcontext():
            optimizer.step()
    return param.detach().float() - init.to(dtype).float()


def share_kept(moved: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of the reference run's total movement that `moved` reproduced (1.0: all of it)."""
    return float((moved * reference.sign()).sum() / reference.abs().sum())
