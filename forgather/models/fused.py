"""One matmul for several projections of the same input, without changing the parameters.

`fused_linear(x, linears)` equals `tuple(linear(x) for linear in linears)` for plain `nn.Linear` layers, computed
as one `F.linear` over their weights (and biases) concatenated along the output dimension, then split. The
parameters stay where they are, so the state dict, checkpoints and exports are those of the separate layers;
autograd routes each slice of the fused gradient back to its own weight. The price is one copy of the weights
per call (a concatenation), the gain one launch of a wider matmul instead of several narrow ones.

`shared_input_linears(x, linears)` (`fused_projections=grad`) keeps the products separate in forward and fuses
what autograd would add in backward: the input's gradient is the sum of each product's, and autograd takes each
with its own matmul and then adds them (in a compiled layer, one more kernel that reads them all and writes
the sum: ~22 us for gate/up and ~29 us for q/k/v a layer at the 1.24B shape on an H200, plus a launch each).
Here the first matmul writes dx and each next one adds into it in cuBLAS's epilogue (`addmm`, beta = 1), which
inductor keeps as one extern call. The weights' gradients are the same products as autograd's. The sum is
rounded once per product instead of once per term; on CPUs the plain layers run (the tutorial's numbers stay),
and so they do without gradients, with biases, under autocast or for sharded (DTensor) weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# fused_projections: False, True (every group of projections of one input: q/k/v, gate/up) or "kv" (the key and
# value products only: at grouped-query shapes they are the narrow ones, 512 wide beside a 2,048-wide query at
# the 1.24B shape, where a narrow product runs well below the GPU's rate; their weights are small, so the
# concatenation costs little, unlike gate/up's) or "grad" (separate products; the input's gradient summed in the
# backward products' epilogue: shared_input_linears).
FUSIONS = (False, True, "kv", "grad")


def fusion(owner: str, fused_projections: bool | str) -> bool | str:
    """`fused_projections` checked against FUSIONS, for `owner`'s error message."""
    if not any(fused_projections is choice or isinstance(choice, str) and fused_projections == choice
               for choice in FUSIONS):
        raise ValueError(f"{owner}: fused_projections={fused_projections!r}; choose false, true (q/k/v and gate/up "
                         f"each as one product), 'kv' (the key and value products only) or 'grad' (separate "
                         f"products, the input's gradient summed in the backward products)")
    return fused_projections


def fusable(*linears: nn.Module) -> bool:
    """True when every layer is exactly an nn.Linear (a subclass may do more than its matmul)."""
    return all(type(linear) is nn.Linear for linear in linears)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)


class _SharedInputProducts(torch.autograd.Function):
    """`F.linear(x, w)` for each w; backward: dx = g_1 @ w_1, then dx += g_i @ w_i in each product's epilogue."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, weight) for weight in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        dx, dweights = None, []
        for index, (grad, weight) in enumerate(zip(grads, weights)):
            grad = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[0]:
                dx = grad @ weight if dx is None else torch.addmm(dx, grad, weight)
            dweights.append(grad.t() @ rows if ctx.needs_input_grad[1 + index] else None)
        return (None if dx is None else dx.view(x.shape), *dweights)


def shared_input_linears(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """`tuple(linear(x) for linear in linears)`; on a GPU in training, the input's gradient summed in cuBLAS's
    epilogue (module docstring). Plain layers where that does not apply."""
    weights = [linear.weight for linear in linears]
    if (
        x.is_cuda and torch.is_grad_enabled() and fusable(*linears)
        and all(linear.bias is None for linear in linears) and not torch.is_autocast_enabled("cuda")
        and all(weight.dtype == x.dtype and not hasattr(weight, "device_mesh") for weight in weights)
    ):
        return _SharedInputProducts.apply(x, *weights)
    return tuple(linear(x) for linear in linears)
