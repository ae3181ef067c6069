"""Model components that Hugging Face families need beyond forgather.models: Qwen3's per-head q/k RMSNorm.

This file is inlined into exported model code like project-local code (the converter passes its directory
as the exporter's `base_dir`), so it imports only torch and forgather.models components.
"""

from __future__ import annotations

import torch
from torch import nn

from forgather.models.attention import Attention
from forgather.models.norm import RMSNorm


class HeadNormedLinear(nn.Linear):
    """A projection followed by RMSNorm over each head's slice of the output (`norm` has head_dim weights)."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, eps: float, bias: bool = False):
        super().__init__(in_features, num_heads * head_dim, bias=bias)
        self.head_dim = head_dim
        self.norm = RMSNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = super().forward(x)
        return self.norm(projected.unflatten(-1, (-1, self.head_dim))).flatten(-2)


class QKNormAttention(Attention):
    """Attention with RMSNorm on each query and key head before RoPE (Qwen3; "QK-norm", Dehghani et al., 2023).

    Takes Attention's arguments plus `qk_norm_eps`. The normed projections replace q_proj and k_proj, so
    Attention.forward runs unchanged; their norms are `q_proj.norm` and `k_proj.norm`.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm_eps: float = 1e-6, bias: bool = False, **kwargs):
        super().__init__(hidden_size, num_heads, bias=bias, **kwargs)
        self.q_proj = HeadNormedLinear(hidden_size, self.num_heads, self.head_dim, qk_norm_eps, bias)
        self.k_proj = HeadNormedLinear(hidden_size, self.num_kv_heads, self.head_dim, qk_norm_eps, bias)
