"""Token embedding: ids [B, T] -> vectors [B, T, H].

`weight` is a plain [V, H] parameter, so a tied LM head can use it as its output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_sizes


class TokenEmbedding(nn.Module):
    """A lookup table of `vocab_size` vectors of size `hidden_size`, times an optional `scale`.

    `scale` multiplies the looked-up vectors (Gemma uses sqrt(hidden_size)); 1.0 leaves them unchanged.
    """

    def __init__(self, vocab_size: int, hidden_size: int, scale: float = 1.0, init_std: float = 0.02):
        super().__init__()
        positive_sizes("TokenEmbedding", vocab_size=vocab_size, hidden_size=hidden_size)
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight)
        return x * self.scale if self.scale != 1.0 else x
