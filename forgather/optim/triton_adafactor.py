"""TritonAdafactor: Adafactor (adafactor.py's math and state) with each 2-D parameter's step in fused kernels.

Contiguous 2-D parameters on CUDA go through adafactor_kernels.py (5 passes over memory per step, see there);
the rest (vectors, >2-D tensors, non-contiguous views) take the reference path, they are small: the vectors of
one shape and step stacked into one update (stacked_reference_update), not ~35 launches each. Construction
raises a clear error without triton or CUDA (TRITON_INTERPRET=1 runs the kernels on CPU tensors, for tests).

RMS(X) for the relative step is summed by the previous step's write pass into state["param_sq"] (two slots,
alternating by step parity). A parameter changed outside the optimizer (its version counter moved, or after
load_state_dict) gets the sum recomputed from the tensor itself before its step.
"""

from __future__ import annotations

from typing import Any

import torch

from forgather.errors import MachineError
from forgather.optim.adafactor import (Adafactor, descent_grad, reference_update, rounds_stochastically,
                                       stacked_reference_update)
from forgather.optim.state import Params
from forgather.triton_support import interpreting


def _load_kernels():
    try:
        from forgather.optim import adafactor_kernels
    except ImportError as exc:
        raise ImportError("TritonAdafactor needs triton: pip install 'forgather[gpu]'") from exc
    return adafactor_kernels


class TritonAdafactor(Adafactor):
    """Adafactor whose per-parameter update of contiguous 2-D tensors runs as Triton kernels."""

    def __init__(
        self,
        params: Params,
        tile: tuple[int, int, int] | None = None,
        num_warps: int | None = None,
        serpentine: bool = True,
        **kwargs: Any,
    ):
        """`tile` = (BLOCK_N, BLOCK_M, ROWS_PER_PROGRAM), `num_warps` and `serpentine` (pass 3 walks backwards
        to reuse L2) tune the kernels; the defaults are adafactor_kernels.py's measured best."""
        if not (torch.cuda.is_available() or interpreting()):
            raise MachineError(
                "TritonAdafactor needs a CUDA device (a GPU), and torch sees none ; on CPU use forgather.optim.Adafactor "
                "(optimizer=adafactor: the same math)"
            )
        self._kernels = _load_kernels()
        k = self._kernels
        block_n, block_m, rows = tile or (k.BLOCK_N, k.BLOCK_M, k.ROWS_PER_PROGRAM)
        if rows % block_n:
            raise ValueError(f"ROWS_PER_PROGRAM ({rows}) must be a multiple of BLOCK_N ({block_n})")
        self._tiles = dict(BLOCK_N=block_n, BLOCK_M=block_m, ROWS_PER_PROGRAM=rows)
        self._num_warps = num_warps or k.NUM_WARPS
        self._serpentine = serpentine
        self._seen_versions: dict[torch.Tensor, int] = {}
        super().__init__(params, **kwargs)

    # torch pickles an optimizer's defaults, state and groups only: the tiling travels too; the kernels are
    # imported again and every parameter's sum of squares recomputed before its next step
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_tiles": self._tiles, "_num_warps": self._num_warps,
                "_serpentine": self._serpentine}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._kernels = _load_kernels()
        self._seen_versions = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seen_versions.clear()

    def update_all(self, pending: list[tuple[torch.Tensor, dict, dict, dict]]) -> None:
        """The 2-D parameters through the kernels one by one; the 1-D ones (a model's norm weights) of one shape,
        dtype, group and step stacked into one update (adafactor.stacked_reference_update), where issuing ~35
        small launches each kept the GPU waiting for the host."""
        stacks: dict[tuple, list[tuple]] = {}
        for param, state, group, scalars in pending:
            if param.dim() == 1 and (param.is_cuda or interpreting()):
                key = (param.shape, param.dtype, param.grad.dtype, param.device, id(group), float(state["step"]))
                stacks.setdefault(key, []).append((param, state, group, scalars))
            else:
                self.update(param, descent_grad(param, group), state, group, scalars)
        for items in stacks.values():
            params, states, groups, scalars = zip(*items)
            if len(items) == 1:
                self.update(params[0], descent_grad(params[0], groups[0]), states[0], groups[0], scalars[0])
                continue
            grads = [descent_grad(p, groups[0]) for p in params]
            stacked_reference_update(list(params), grads, list(states), groups[0], scalars[0])

    def update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        scalars: dict[str, float],
    ) -> None:
        fused = param.dim() == 2 and param.is_contiguous() and grad.is_contiguous()
        if not fused or not (param.is_cuda or interpreting()):
            reference_update(param, grad, state, group, scalars)
            return
        self._fused_update(param, grad, state, group, scalars)

    def _param_sq(self, param: torch.Tensor, state: dict[str, Any], prev_slot: int) -> torch.Tensor:
        """state["param_sq"], with the previous slot recomputed when the optimizer did not write X last."""
        if "param_sq" not in state:
            state["param_sq"] = torch.zeros(2, dtype=torch.float32, device=param.device)
        if self._seen_versions.get(param) != param._version:
            state["param_sq"][prev_slot] = torch.linalg.vector_norm(param, dtype=torch.float32).square()
            self._seen_versions[param] = param._version
        return state["param_sq"]

    def _fused_update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        scalars: dict[str, float],
    ) -> None:
        k = self._kernels
        n, m = param.shape
        step = int(state["step"].item())
        cur_slot, prev_slot = step % 2, (step - 1) % 2
        param_sq = self._param_sq(param, state, prev_slot)
        # Workspace: row sums [n], column sums [m], sum of U^2, 1 / mean(R).
        work = torch.zeros(n + m + 2, dtype=torch.float32, device=param.device)
        row_sum, col_sum, update_sq, inv_row_mean = work[:n], work[n : n + m], work[n + m :], work[n + m + 1 :]
        tiles, warps = self._tiles, self._num_warps
        grid = (triton_cdiv(m, tiles["BLOCK_M"]), triton_cdiv(n, tiles["ROWS_PER_PROGRAM"]))
        eps1 = scalars["eps1"]
        k.grad_sq_sums[grid](grad, row_sum, col_sum, n, m, **tiles, num_warps=warps)
        k.finalize[(1,)](
            state["row_var"], state["col_var"], row_sum, col_sum, inv_row_mean, param_sq, n, m,
            scalars["one_minus_beta2"], eps1, cur_slot, BLOCK=k.FINALIZE_BLOCK, num_warps=4,
        )
        k.update_sq_sum[grid](
            grad, state["row_var"], state["col_var"], inv_row_mean, update_sq, n, m, eps1, **tiles,
            REVERSE=self._serpentine, num_warps=warps,
        )
        beta1 = group["beta1"]
        k.apply_update[grid](
            param, grad, state.get("exp_avg", param), state["row_var"], state["col_var"], inv_row_mean,
            update_sq, param_sq, n, m, 1.0 / (n * m), eps1, scalars["eps2"], scalars["rho"], group["d"],
            1.0 - group["lr"] * group["weight_decay"],
            0.0 if beta1 is None else 1.0 - beta1, prev_slot, cur_slot, scalars["seed"],
            SCALE_PARAMETER=group["scale_parameter"], HAS_MOMENT=beta1 is not None,
            STOCHASTIC_ROUNDING=rounds_stochastically(param, group), **tiles, num_warps=warps,
        )
        self._seen_versions[param] = param._version


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
