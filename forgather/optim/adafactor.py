"""Adafactor (Shazeer & Stern, 2018): factored second moments, relative step size, update clipping.

The PyTorch reference; `TritonAdafactor` runs the same math in fused kernels. Per parameter X with gradient
G at step t (the conventions of `torch.optim.Adafactor`, so the two agree when beta1 is None):

    beta2_t = 1 - t^beta2_decay                            (decay schedule; beta2_decay = -0.8)
    rho_t   = min(lr, 1/sqrt(t)) if relative_step else lr    (relative step size)
    alpha_t = max(eps2, RMS(X)) * rho_t if scale_parameter else rho_t
    factored (ndim >= 2, last two dims n x m):
        R <- lerp(R, mean_j G^2, 1 - beta2_t)    C <- lerp(C, mean_i G^2, 1 - beta2_t)
        V = R_i C_j / max(mean_i R, eps1)
    not factored: V <- lerp(V, G^2, 1 - beta2_t)
    U = G / sqrt(max(V, eps1^2));  U <- U / max(1, RMS(U) / d)      (update clipping)
    optional first moment (beta1): M <- lerp(M, U, 1 - beta1);  U <- M
    X <- X * (1 - lr * weight_decay) - alpha_t * U

State: step, and R [.., n] and C [.., m] (fp32) for factored parameters or V for the others, plus M when beta1
is set. Math runs in fp32 whatever the parameter dtype; bf16 parameters are rounded once, on write, and
stochastically by default (`stochastic_rounding`, forgather/optim/rounding.py): rounded to nearest, updates
below half a bf16 step (~0.2% of the weight: most of Adafactor's, at fine-tuning rates) would be lost.
eps1=None means float32's machine epsilon.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from forgather.optim.rounding import step_seed, stochastic_round_to_bf16
from forgather.optim.state import (
    Layout, Params, check_number, load_state_keeping_fp32, parameters_with_grads, run_closure,
)

FP32_STATE = {"row_var", "col_var", "variance", "param_sq"}


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / math.sqrt(x.numel())


class Adafactor(Optimizer):
    """Adafactor with optional first moment, relative step and update clipping (see the module docstring)."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta1: float | None = None,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        relative_step: bool = True,
        scale_parameter: bool = True,
        maximize: bool = False,
        stochastic_rounding: bool = True,
        seed: int = 0,
    ):
        owner = type(self).__name__
        check_number(owner, "lr", lr, lambda x: x > 0, "a number > 0, e.g. 1e-2")
        if beta1 is not None:
            check_number(owner, "beta1", beta1, lambda x: 0 <= x < 1, "a number in [0, 1), or None (no first moment)")
        check_number(owner, "beta2_decay", beta2_decay, lambda x: x <= 0, "a number <= 0, e.g. -0.8")
        pair = isinstance(eps, (tuple, list)) and len(eps) == 2
        if not pair or not all(e is None and i == 0 or not isinstance(e, bool) and isinstance(e, (int, float)) and e >= 0
                               for i, e in enumerate(eps)):
            raise ValueError(f"{owner}(eps={eps!r}): eps takes a pair (eps1, eps2) of numbers >= 0, eps1 also None "
                             "(float32's epsilon), e.g. (None, 1e-3)")
        check_number(owner, "d", d, lambda x: x > 0, "a clipping threshold > 0, e.g. 1.0")
        check_number(owner, "weight_decay", weight_decay, lambda x: x >= 0, "a number >= 0, e.g. 0.01")
        defaults = dict(
            lr=lr, beta1=beta1, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
            relative_step=relative_step, scale_parameter=scale_parameter, maximize=maximize,
            stochastic_rounding=stochastic_rounding, seed=seed,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        pending = []
        for group, param in parameters_with_grads(self, dense_only="Adafactor"):
            state = self.state[param]
            if not state:
                self.init_state(param, state, group)
            state["step"] += 1
            pending.append((param, state, group, step_scalars(group, int(state["step"].item()))))
        self.update_all(pending)
        return loss

    def update_all(self, pending: list[tuple[torch.Tensor, dict, dict, dict]]) -> None:
        """Every parameter's step: (param, state, group, scalars) each; subclasses may take several at once. (The
        gradient to follow is taken at its update: a maximizing step's negated copy lives for that update only.)"""
        for param, state, group, scalars in pending:
            self.update(param, descent_grad(param, group), state, group, scalars)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_keeping_fp32(self, state_dict, FP32_STATE, super().load_state_dict, state_layout)

    @staticmethod
    def init_state(param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        if param.dim() >= 2:
            state["row_var"] = param.new_zeros(param.shape[:-1], dtype=torch.float32)
            state["col_var"] = param.new_zeros(param.shape[:-2] + param.shape[-1:], dtype=torch.float32)
        else:
            state["variance"] = torch.zeros_like(param, dtype=torch.float32)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        scalars: dict[str, float],
    ) -> None:
        """One parameter's step; subclasses replace it with a faster path for the tensors they handle."""
        reference_update(param, grad, state, group, scalars)


def state_layout(param: torch.Tensor, group: dict[str, Any]) -> Layout:
    """What init_state keeps for `param` (check_saved_state), and TritonAdafactor's `param_sq` besides."""
    shape = tuple(param.shape)
    if param.dim() >= 2:
        needed = {"row_var": shape[:-1], "col_var": shape[:-2] + shape[-1:]}
    else:
        needed = {"variance": shape}
    if group["beta1"] is not None:
        needed["exp_avg"] = shape
    return {"step": None, **needed}, {"param_sq"}


def descent_grad(param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The gradient the update follows: negated where the group maximizes."""
    return -param.grad if group["maximize"] else param.grad


def step_scalars(group: dict[str, Any], step: int) -> dict[str, float]:
    """The host-side numbers of one step: 1 - beta2_t, rho_t, eps1 (resolved), eps2 and the rounding seed."""
    eps1, eps2 = group["eps"]
    rho = min(group["lr"], step**-0.5) if group["relative_step"] else group["lr"]
    return {
        "one_minus_beta2": step ** group["beta2_decay"],
        "rho": rho,
        "eps1": torch.finfo(torch.float32).eps if eps1 is None else eps1,
        "eps2": eps2,
        "seed": step_seed(group.get("seed", 0), step),
    }


def rounds_stochastically(param: torch.Tensor, group: dict[str, Any]) -> bool:
    # .get: param groups saved before the option existed load without it.
    return param.dtype == torch.bfloat16 and group.get("stochastic_rounding", True)


def reference_update(
    param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], scalars: dict[str, float]
) -> None:
    """The Adafactor update of one parameter in plain PyTorch, fp32 math (the spec the kernels follow). The
    step size and the clipping stay on the device: reading them on the host (`.item()`) made the host wait
    for the GPU twice for each parameter this path takes (on the H200, 130 waits a step of the 7B model's
    norms under the Triton optimizer, ~10% of the step idle)."""
    x = param.float()
    g = grad.float()
    eps1 = scalars["eps1"]
    alpha = rms(x).clamp(min=scalars["eps2"]) * scalars["rho"] if group["scale_parameter"] else scalars["rho"]
    if param.dim() >= 2:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(g.square().mean(dim=-1), scalars["one_minus_beta2"])
        col_var.lerp_(g.square().mean(dim=-2), scalars["one_minus_beta2"])
        row_mean = row_var.mean(dim=-1, keepdim=True).clamp(min=eps1)
        var = (row_var / row_mean).unsqueeze(-1) * col_var.unsqueeze(-2)
    else:
        state["variance"].lerp_(g.square(), scalars["one_minus_beta2"])
        var = state["variance"]
    update = g * var.clamp(min=eps1 * eps1).rsqrt()
    update.div_((rms(update) / group["d"]).clamp(min=1.0))
    if group["beta1"] is not None:
        exp_avg = state["exp_avg"]
        exp_avg.copy_(exp_avg.float().lerp_(update, 1 - group["beta1"]))
        update = exp_avg.float()
    if group["weight_decay"]:
        x.mul_(1 - group["lr"] * group["weight_decay"])
    x.sub_(update * alpha)
    param.copy_(stochastic_round_to_bf16(x, scalars["seed"]) if rounds_stochastically(param, group) else x)


def stacked_reference_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any],
    scalars: dict[str, float],
) -> None:
    """reference_update of k 1-D parameters of one shape, dtype, device and step, as one [k, n] computation:
    the same math row by row (the norms per row), ~25 launches in all where each parameter alone takes ~35.
    Why: a model's norm weights are many small vectors, and issuing their updates one by one kept a GPU idle
    (the 7B step's profile, docs/benchmarks.md). Same results within fp32 rounding (a row's norm may sum in
    another order than the vector's)."""
    n = params[0].shape[-1]

    def row_rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2, dim=-1, keepdim=True) / math.sqrt(n)

    x = torch.stack(params).float()
    g = torch.stack(grads).float()
    eps1 = scalars["eps1"]
    alpha = row_rms(x).clamp(min=scalars["eps2"]) * scalars["rho"] if group["scale_parameter"] else scalars["rho"]
    variances = [state["variance"] for state in states]
    variance = torch.stack(variances).lerp_(g.square(), scalars["one_minus_beta2"])
    update = g * variance.clamp(min=eps1 * eps1).rsqrt()
    update.div_((row_rms(update) / group["d"]).clamp(min=1.0))
    if group["beta1"] is not None:
        exp_avgs = [state["exp_avg"] for state in states]
        kept = torch.stack(exp_avgs).float().lerp_(update, 1 - group["beta1"]).to(exp_avgs[0].dtype)
        torch._foreach_copy_(exp_avgs, list(kept.unbind(0)))
        update = kept.float()
    if group["weight_decay"]:
        x.mul_(1 - group["lr"] * group["weight_decay"])
    x.sub_(update * alpha)
    if rounds_stochastically(params[0], group):
        index = torch.arange(n, device=x.device, dtype=torch.int64)
        x = stochastic_round_to_bf16(x, scalars["seed"], index)
    torch._foreach_copy_(params, list(x.unbind(0)))
    torch._foreach_copy_(variances, list(variance.unbind(0)))
