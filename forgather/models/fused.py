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


# fused_projections: False, True (every group of projections of one input: q/k/v, gate/up), "kv" (the key and
# value products only: at grouped-query shapes they are the narrow ones, 512 wide beside a 2,048-wide query at
# the 1.24B shape, where a narrow product runs well below the GPU's rate; their weights are small, so the
# concatenation costs little, unlike gate/up's) or "qkv" (the attention's three, gate and up apart: one product
# for the input's gradient replaces three and the add of their results, while gate/up as one has the slower
# weight gradient and a 64 MB concatenation a layer at that shape), or "auto" (what the templates default to:
# "qkv" on a GPU, where it measured 1.006x the separate products at the 1.24B shape, H100, 2026-12-05; separate
# products elsewhere, so the CPU's numbers stay those of the plain layers).
FUSIONS = (False, True, "kv", "qkv", "auto")


def fusion(owner: str, fused_projections: bool | str) -> bool | str:
    """`fused_projections` checked against FUSIONS, for `owner`'s error message."""
    if not any(fused_projections is choice or isinstance(choice, str) and fused_projections == choice
               for choice in FUSIONS):
        raise ValueError(f"{owner}: fused_projections={fused_projections!r}; choose false, true (q/k/v and gate/up "
                         f"each as one product), 'qkv' (the query, key and value products only), 'kv' (the key "
                         f"and value products only) or 'auto' ('qkv' on a GPU, separate elsewhere)")
    return fused_projections


def fused_attention_projections(fused_projections: bool | str, x: torch.Tensor) -> bool | str:
    """What an attention's `fused_projections` means for input `x`: "auto" is "qkv" on a GPU, else false."""
    if fused_projections == "auto":
        return "qkv" if x.is_cuda else False
    return fused_projections


def fusable(*linears: nn.Module) -> bool:
    """True when every layer is exactly an nn.Linear (a subclass may do more than its matmul)."""
    return all(type(linear) is nn.Linear for linear in linears)


def fused_product(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The layers' outputs side by side [..., sum of out_features], as one product."""
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    return fused_product(x, linears).split([linear.out_features for linear in linears], dim=-1)
