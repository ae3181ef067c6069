"""One matmul for several projections of the same input, without changing the parameters.

`fused_linear(x, linears)` equals `tuple(linear(x) for linear in linears)` for plain `nn.Linear` layers, computed
as one `F.linear` over their weights (and biases) concatenated along the output dimension, then split. The
parameters stay where they are, so the state dict, checkpoints and exports are those of the separate layers;
autograd routes each slice of the fused gradient back to its own weight. The price is one copy of the weights
per call (a concatenation), the gain one launch of a wider matmul instead of several narrow ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fusable(*linears: nn.Module) -> bool:
    """True when every layer is exactly an nn.Linear (a subclass may do more than its matmul)."""
    return all(type(linear) is nn.Linear for linear in linears)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)
