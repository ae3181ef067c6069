"""Normalization layers: RMSNorm and LayerNorm over the last (hidden) dimension.

Both take `hidden_size` first, so a layer calls `norm_factory(hidden_size)`. Statistics are computed in
float32 and the result is cast back, so bf16/fp16 activations normalize as accurately as fp32 ones.
RMSNorm's output takes the promoted dtype of weight and input, as in Hugging Face Llama (fp32 under autocast).

`add_and_norm(norm, x, delta)` -> (x + delta, norm(x + delta)) is how a pre-LN layer joins a sublayer's output to
the residual stream and normalizes the sum; `RMSNorm(fused=True)` does both on a GPU in one Triton kernel forward
and one backward (fused_rms_norm.py), any other norm in two steps.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_sizes
from .triton_ops import triton_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, the statistics in float32 (also the serving engine's fused
    decoder's norm, forgather/serve/fused.py)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Scale after casting back, as Llama does: backward then keeps the normed copy in x's dtype, not fp32.
    return weight * normed.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta, weight, eps)): a residual add and the norm of the sum, the semantics of the
    fused ops (fused_rms_norm.add_rms_norm) in torch."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * weight, no mean subtraction, no bias.

    fused: on CUDA tensors, run the norm (and in `add_and_norm`, the residual add before it) as our Triton ops,
    forward and backward one kernel each; elsewhere, and without Triton, the same `rms_norm` in torch.

    `norm(x)` is the norm; `norm(x, delta)` is (x + delta, the norm of that), so both go through `__call__`, where
    module hooks run: accelerate's `device_map` offload puts the weight in place in a hook on `forward`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        positive_sizes("RMSNorm", hidden_size=hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.fused = fused
        ops = triton_ops("fused_rms_norm") if fused else None
        if fused and ops is None and torch.cuda.is_available():
            warnings.warn("RMSNorm(fused=True) runs the torch norm: Triton is not installed (pip install triton, "
                          "or forgather[gpu])", stacklevel=2)
        # the ops' functions, not their module: a model must stay picklable and deep-copyable
        self._fused = (ops.rms_norm, ops.add_rms_norm) if ops is not None else None

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            # with the fused ops, one kernel (x's dtype must hold the sum's)
            if self._fused is not None and x.is_cuda and torch.promote_types(x.dtype, delta.dtype) == x.dtype:
                return self._fused[1](x, delta, self.weight, self.eps)
            return add_rms_norm(x, delta, self.weight, self.eps)
        if self._fused is not None and x.is_cuda:
            return self._fused[0](x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)), through `__call__` (so the module's hooks run)."""
        return self(x, delta)


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)): the residual stream after a sublayer, and its norm. A norm with its own
    `add_and_norm` (RMSNorm) does both, in one kernel where it can; any other norm in two steps."""
    fused = getattr(norm, "add_and_norm", None)
    if fused is not None:
        return fused(x, delta)
    x = x + delta
    return x, norm(x)


class LayerNorm(nn.Module):
    """Layer norm (Ba et al., 2016) with learned gain and optional bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        positive_sizes("LayerNorm", hidden_size=hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        normed = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps)
        return normed.to(x.dtype)
