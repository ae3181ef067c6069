"""Optimizer step inside backward: one optimizer per parameter, stepped as soon as its gradient is complete.

`optimizer_in_backward(model, factory)` builds `factory([p])` for every trainable parameter p and registers a
`register_post_accumulate_grad_hook` that steps it and sets `p.grad = None`, so at most one parameter's
gradient is alive at a time (plus whatever autograd holds). Works with any optimizer class taking a param list.

The returned `OptimizerInBackward` is a `torch.optim.Optimizer` a training loop can hold: `step(closure)` runs
the closure (whose backward does the steps), `zero_grad()` has nothing to do, `param_groups` are the
per-parameter optimizers' own groups (so LR schedulers drive them), and `state_dict()` / `load_state_dict()`
carry every per-parameter optimizer. Not possible with it: gradient accumulation across backward passes and
gradient clipping by global norm (each step happens before the other gradients exist).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from forgather.optim.state import run_closure

OptimizerFactory = Callable[[list[nn.Parameter]], Optimizer]


class OptimizerInBackward(Optimizer):
    """Per-parameter optimizers stepped from post-accumulate-grad hooks (see module docstring)."""

    def __init__(self, params: Iterable[nn.Parameter], optimizer_factory: OptimizerFactory):
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("optimizer_in_backward got no parameter that requires grad")
        super().__init__(trainable, defaults={})
        self.optimizers: dict[nn.Parameter, Optimizer] = {p: optimizer_factory([p]) for p in trainable}
        self.param_groups = [group for opt in self.optimizers.values() for group in opt.param_groups]
        self._handles = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in trainable]

    def _step_parameter(self, param: nn.Parameter) -> None:
        self.optimizers[param].step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The steps already happened in backward; a closure (Lightning passes one) runs forward + backward."""
        return run_closure(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed right after each parameter's step: nothing is left to zero."""

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["per_parameter"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(saved)} optimizers, this one has {len(self.optimizers)}")
        for opt, opt_state in zip(self.optimizers.values(), saved):
            opt.load_state_dict(opt_state)
        self.param_groups = [group for opt in self.optimizers.values() for group in opt.param_groups]

    def remove_hooks(self) -> None:
        """Detach from the parameters (after which backward leaves gradients in place again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def optimizer_in_backward(
    model: nn.Module | Iterable[nn.Parameter], optimizer_factory: OptimizerFactory
) -> OptimizerInBackward:
    """Step `optimizer_factory([p])` for each trainable parameter of `model` inside backward."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    return OptimizerInBackward(params, optimizer_factory)
