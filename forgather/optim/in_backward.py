"""Optimizer step inside backward: one optimizer per parameter, stepped as soon as its gradient is complete.

`optimizer_in_backward(model, factory)` builds `factory([p])` for every trainable parameter p and registers a
`register_post_accumulate_grad_hook` that steps it and sets `p.grad = None`, so at most one parameter's
gradient is alive at a time (plus whatever autograd holds). Works with any optimizer class taking a param list.

The returned `OptimizerInBackward` is a `torch.optim.Optimizer` a training loop can hold: `step(closure)` runs
the closure (whose backward does the steps), `zero_grad()` has nothing to do, `param_groups` are the
per-parameter optimizers' own groups (so LR schedulers drive them), and `state_dict()` / `load_state_dict()`
carry every per-parameter optimizer. Not possible with it: gradient accumulation across backward passes and
gradient clipping by global norm (each step happens before the other gradients exist); forgather's
LightningModule refuses a trainer set for either (gradient_clip_val, accumulate_grad_batches > 1) in one line.

`overlap=True` (CUDA parameters only; elsewhere it changes nothing): each parameter's step runs on a side
stream, ordered after the work that produced its gradient, so the optimizer's memory-bound kernels run
alongside the rest of backward's products instead of after them. Safe because a parameter's
post-accumulate-grad hook fires once autograd is done with it (the node that used it has produced its
gradient; a parameter used twice, as a tied embedding is, gets one hook after both). The gradient is kept
alive for the side stream (`record_stream`) when it is dropped, and at the end of each backward pass (an
autograd engine callback) the stream that ran backward waits for the side stream, so whatever comes next --
the next forward, a checkpoint, any loop of the user's -- sees the updated parameters. The arithmetic is the
same per-parameter step either way: the results are identical.
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

    def __init__(self, params: Iterable[nn.Parameter], optimizer_factory: OptimizerFactory, overlap: bool = False):
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("optimizer_in_backward got no parameter that requires grad")
        super().__init__(trainable, defaults={})
        self.optimizers: dict[nn.Parameter, Optimizer] = {p: optimizer_factory([p]) for p in trainable}
        self.param_groups = [group for opt in self.optimizers.values() for group in opt.param_groups]
        self._handles = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in trainable]
        self.overlap = overlap
        self._side: dict[torch.device, torch.cuda.Stream] = {}  # a side stream per CUDA device (overlap)
        self._waiting: dict[torch.device, torch.cuda.Stream] = {}  # backward's streams to join at its end
        self._joining = -1  # the backward pass (autograd graph task) whose end has the join queued

    def _step_parameter(self, param: nn.Parameter) -> None:
        if not (self.overlap and param.is_cuda):
            self.optimizers[param].step()
            param.grad = None
            return
        device = param.device
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        side, backward = self._side[device], torch.cuda.current_stream(device)
        side.wait_stream(backward)  # the gradient, and every earlier use of the parameter, are complete
        with torch.cuda.stream(side):
            self.optimizers[param].step()
        param.grad.record_stream(side)  # its memory is not reused until the side stream has read it
        param.grad = None
        task = torch._C._current_graph_task_id()
        if task != self._joining:  # the first overlapped step of this backward pass: join at its end (by task, so
            self._joining = task  # that a pass that raised before its end does not leave later ones unjoined)
            torch.autograd.Variable._execution_engine.queue_callback(self._join)
        self._waiting[device] = backward

    def _join(self) -> None:
        """End of a backward pass: the streams that ran it wait for the parameters' steps."""
        for device, backward in self._waiting.items():
            backward.wait_stream(self._side[device])
        self._waiting.clear()

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
    model: nn.Module | Iterable[nn.Parameter], optimizer_factory: OptimizerFactory, overlap: bool = False
) -> OptimizerInBackward:
    """Step `optimizer_factory([p])` for each trainable parameter of `model` inside backward (on a side stream
    with `overlap`)."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    return OptimizerInBackward(params, optimizer_factory, overlap)
