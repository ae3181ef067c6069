"""Position-wise feed-forward blocks: [B, T, H] -> [B, T, H].

Each takes `hidden_size` first, so a layer calls `feedforward_factory(hidden_size)`; set the rest
(`intermediate_size`, `bias`) in the partial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Gated feed-forward with a SiLU gate (Shazeer, 2020, "GLU Variants"): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    """The GPT-2 MLP: down(gelu(up(x))); `approximate="tanh"` gives GPT-2's tanh GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))
