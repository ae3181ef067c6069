"""torch's AdamW with its step compiled: the foreach implementation through torch.compile, on CUDA.

Why: torch's fused AdamW (`fused=True`, one multi-tensor CUDA kernel) streams a pure-bf16 1.24B model's
parameters, gradients and moments (14 bytes a parameter) at 2.7 TB/s on an H200, 6.4 ms a step; the same
algorithm written with foreach ops and compiled by inductor, which fuses each group's ops into few
horizontal kernels, takes 4.5 ms (3.9 TB/s; scripts/bench_step_pieces.py, docs/benchmarks.md). That is
torch's own recipe (torch.compile of `optimizer.step`); this class makes it a drop-in optimizer:

- `step(closure)` runs Lightning's closure (forward and backward) eagerly, then the compiled update, so the
  compiled graph never holds the model's forward;
- on CUDA the learning rate lives in a device tensor (`capturable=True`), which LR schedulers fill in place
  (torch.optim.lr_scheduler does so for tensor rates): a new rate each step is not a new compile, and the
  step never reads a value back to the host; a loaded state dict gets its rate put back into such a tensor;
- elsewhere (the CPU) it is torch's foreach AdamW, eager unless `compile=True`: the same arithmetic.

The update is torch.optim.AdamW's (the foreach code path), so its state dict is AdamW's and checkpoints move
between the two. Parameters on one device (a single GPU, or each rank's under DDP); several devices are an
error. Sharded parameters (DTensor, FSDP2) have not run through it: multi-GPU machines were not lent.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from forgather.optim.state import adam_layout, check_saved_state

CAPTURABLE_DEVICES = ("cuda",)  # where the step is compiled and the rate lives on the device


class CompiledAdamW(torch.optim.AdamW):
    """AdamW(params, lr, betas, eps, weight_decay, amsgrad) whose step is compiled on CUDA (module docstring).
    `compile`: None (default) compiles where the parameters are on CUDA; True or False forces it."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, compile: bool | None = None):
        params = list(params)
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        if not tensors:
            raise ValueError("CompiledAdamW got no parameters to optimize")
        self._device = tensors[0].device
        others = sorted({str(t.device) for t in tensors} - {str(self._device)})
        if others:  # one rate tensor serves every parameter, and the foreach kernels take one device
            raise ValueError(f"CompiledAdamW steps parameters on one device; got {self._device} and "
                             f"{', '.join(others)} (give each device's parameters an optimizer of its own, or use "
                             f"optimizer=adamw)")
        capturable = self._device.type in CAPTURABLE_DEVICES
        # Each group's rate becomes a device tensor in add_param_group (which __init__ calls for every group).
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=True, capturable=capturable)
        self._compile = capturable if compile is None else compile
        self._compiled: Callable[[], Any] | None = None

    # torch's Optimizer pickles its defaults, state and groups only: the device and the choice travel too, the
    # compiled step is made again where it is next used
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_device": self._device, "_compile": self._compile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._compiled = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._rate_on_device(self.param_groups[-1])

    def _rate_on_device(self, group: dict[str, Any]) -> None:
        """Where the step is captured, make `group`'s rate a float32 0-d tensor on the parameters' device:
        a float rate would be a new compile at every new value, and a loaded one may be a float or a tensor
        mapped elsewhere."""
        lr = group["lr"]
        on_device = isinstance(lr, torch.Tensor) and lr.device == self._device and lr.dtype == torch.float32
        if self.defaults["capturable"] and not on_device:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self._device)

    def _update(self) -> None:
        torch.optim.AdamW.step(self)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._compile:
            self._update()
        else:
            if self._compiled is None:
                self._compiled = torch.compile(self._update)
            self._compiled()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_saved_state(self, state_dict, adam_layout)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._rate_on_device(group)
