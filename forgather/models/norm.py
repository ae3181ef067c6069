"""Normalization layers: RMSNorm and LayerNorm over the last (hidden) dimension.

Both take `hidden_size` first, so a layer calls `norm_factory(hidden_size)`. Statistics are computed in
float32 and the result is cast back, so bf16/fp16 activations normalize as accurately as fp32 ones.
RMSNorm's output takes the promoted dtype of weight and input, as in Hugging Face Llama (fp32 under autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, the statistics in float32 (also the serving engine's fused
    decoder's norm, forgather/serve/fused.py)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Scale after casting back, as Llama does: backward then keeps the normed copy in x's dtype, not fp32.
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * weight, no mean subtraction, no bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """Layer norm (Ba et al., 2016) with learned gain and optional bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        normed = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps)
        return normed.to(x.dtype)
