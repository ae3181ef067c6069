"""LowRankAdamW: AdamW whose 2-D parameters keep their moments in a low-rank projection of the gradient.

The shared machinery of GaLore (galore.py) and APOLLO (apollo.py). For a 2-D parameter W [m, n] with
gradient G and rank r < min(m, n), every `update_proj_gap` steps a subclass picks a projection P; the
smaller side is kept and the larger projected away:
    m >= n:  R = G P^T      (P [r, n], R [m, r], "right")      m < n:  R = P G   (P [r, m], R [r, n], "left")
Adam's moments live on R, so the state is 2 x r x max(m, n) instead of 2 x m x n. The subclass turns the
Adam direction N on R back into a full-rank update (`full_rank_update`). Parameters that are not 2-D, or
whose group has rank=None, get plain AdamW. Decoupled weight decay: W <- W (1 - lr wd) - lr update.
Every state entry is a tensor, so checkpoints load with torch.load(weights_only=True).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from forgather.optim.state import (
    Layout, Params, check_adam_arguments, check_number, load_state_keeping_fp32, parameters_with_grads, run_closure,
)

FP32_STATE = {"exp_avg", "exp_avg_sq", "projection", "update_norm"}


class LowRankAdamW(Optimizer):
    """AdamW with low-rank moments for 2-D parameters; subclasses choose the projection and the update."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int | None = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
    ):
        owner = type(self).__name__
        check_adam_arguments(owner, lr, betas, eps, weight_decay)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{owner}(rank={rank!r}): rank takes an integer >= 1, or None for plain AdamW")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"{owner}(update_proj_gap={update_proj_gap!r}): update_proj_gap takes a number of "
                             "steps >= 1, e.g. 200")
        check_number(owner, "scale", scale, lambda x: x > 0, "a number > 0, e.g. 0.25")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
            scale=scale,
        )
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_keeping_fp32(self, state_dict, FP32_STATE, super().load_state_dict, self.state_layout)

    def state_layout(self, param: torch.Tensor, group: dict[str, Any]) -> Layout:
        """What `_update` keeps for `param` (check_saved_state): the projection and the moments on R where the
        parameter is low-rank, else moments shaped like it."""
        if not self._low_rank(param, group):
            return {"step": None, "exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}, set()
        (m, n), rank = param.shape, group["rank"]
        right = m >= n
        moments = (m, rank) if right else (rank, n)
        return {"step": None, "projection": (rank, n if right else m), "exp_avg": moments, "exp_avg_sq": moments}, set()

    def new_projection(self, grad: torch.Tensor, rank: int, right: bool, draw: tuple[int, int]) -> torch.Tensor:
        """A projection P [rank, n] (right) or [rank, m] (left) for this gradient; `draw` is (the parameter's
        place among the optimizer's, the step), for a subclass whose projection is random."""
        raise NotImplementedError

    def full_rank_update(
        self, grad: torch.Tensor, low_rank_grad: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
        group: dict[str, Any],
    ) -> torch.Tensor:
        """The [m, n] update from the Adam direction on the projected gradient."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        for group, param in parameters_with_grads(self):
            self._update(param, param.grad.float(), self.state[param], group)
        return loss

    def _place(self, param: torch.Tensor) -> int:
        """The parameter's place among the optimizer's (param_groups order, which a state dict keeps)."""
        params = (p for group in self.param_groups for p in group["params"])
        return next(i for i, p in enumerate(params) if p is param)

    def _low_rank(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        return param.dim() == 2 and group["rank"] is not None and group["rank"] < min(param.shape)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        step = int(state["step"].item()) if state else 0
        if not state:
            state["step"] = torch.tensor(0.0)
        if self._low_rank(param, group):
            right = param.shape[0] >= param.shape[1]
            if step % group["update_proj_gap"] == 0:
                state["projection"] = self.new_projection(grad, group["rank"], right, (self._place(param), step))
            projection = state["projection"]
            low_rank = grad @ projection.t() if right else projection @ grad
            update = self.full_rank_update(grad, low_rank, adam_direction(low_rank, state, group, step), state, group)
        else:
            update = adam_direction(grad, state, group, step)
        state["step"] += 1
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"])


def adam_direction(grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int) -> torch.Tensor:
    """Bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps) for `grad`; moments kept in fp32 `state`."""
    beta1, beta2 = group["betas"]
    if "exp_avg" not in state or state["exp_avg"].shape != grad.shape:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = step + 1
    denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
    return exp_avg / (1 - beta1**t) / denom


def channel_norm(x: torch.Tensor, right: bool) -> torch.Tensor:
    """Norms of the channels a projection keeps: rows of R [m, r] (right) or columns of R [r, n] (left)."""
    return x.norm(dim=1, keepdim=True) if right else x.norm(dim=0, keepdim=True)


