"""One matmul for several projections of the same input, without changing the parameters.

`fused_linear(x, linears)` equals `tuple(linear(x) for linear in linears)` for plain `nn.Linear` layers, computed
as one `F.linear` over their weights (and biases) concatenated along the output dimension, then split. The
parameters stay where they are, so the state dict, checkpoints and exports are those of the separate layers;
autograd routes each slice of the fused gradient back to its own weight. The price is one copy of the weights
per call (a concatenation), the gain one launch of a wider matmul instead of several narrow ones.

`packed_linear(x, weights)` (`fused_projections=packed`) is the same product without the copy.
- `pack_weights` moves the weights once, back to back, into one buffer: each Parameter stays the same object,
  with the same values, its data now a view of that buffer. CausalLMModule does this when training starts,
  on the device, after Lightning has moved the model.
- The product then reads the buffer as one [sum of rows, in] matrix (`packed_weight`).
- Backward is one product for the input's gradient, over every weight: no kernel adding the projections' input
  gradients, which the separate products leave (29 us a layer for q/k/v and 22 for gate/up at the 1.24B shape
  on an H200).
- The weights' gradients come as one product, or one a projection, written into one buffer. Autograd hands each
  weight its rows, so they too lie back to back.
- Weights that are not packed (moved since, or never packed) are concatenated as fused_linear does: the same
  numbers, a copy's cost.

Both directions are torch.library ops: torch.compile sees them whole and does not trace the check of where
the weights lie.
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
# weight gradient and a 64 MB concatenation a layer at that shape).
# "packed": q/k/v and gate/up each one product over weights packed back to back (packed_linear, no concatenation).
FUSIONS = (False, True, "kv", "qkv", "packed")


def fusion(owner: str, fused_projections: bool | str) -> bool | str:
    """`fused_projections` checked against FUSIONS, for `owner`'s error message."""
    if not any(fused_projections is choice or isinstance(choice, str) and fused_projections == choice
               for choice in FUSIONS):
        raise ValueError(f"{owner}: fused_projections={fused_projections!r}; choose false, true (q/k/v and gate/up "
                         f"each as one product), 'packed' (the same over weights packed into one buffer), 'qkv' "
                         f"(the query, key and value products only) or 'kv' (the key and value products only)")
    return fused_projections


def fusable(*linears: nn.Module) -> bool:
    """True when every layer is exactly an nn.Linear (a subclass may do more than its matmul)."""
    return all(type(linear) is nn.Linear for linear in linears)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    weight = torch.cat([linear.weight for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)


def packed_weight(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights' rows as one [sum of rows, in] tensor, without a copy, when they lie back to back in one
    storage (pack_weights); else None."""
    first = weights[0]
    offset = 0
    for weight in weights:
        if (weight.dim() != 2 or weight.shape[1] != first.shape[1] or weight.dtype != first.dtype
                or weight.device != first.device or not weight.is_contiguous()
                or weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or weight.storage_offset() != first.storage_offset() + offset):
            return None
        offset += weight.numel()
    return first.as_strided((sum(weight.shape[0] for weight in weights), first.shape[1]), (first.shape[1], 1))


def pack_weights(linears: tuple[nn.Linear, ...]) -> bool:
    """Move the layers' weights back to back into one new buffer (the Parameters the same objects, their values
    unchanged); True when they lie so now. Only plain tensors of one device and dtype without gradients yet
    (not FSDP's flat or sharded parameters)."""
    weights = [linear.weight for linear in linears]
    if packed_weight(weights) is not None:
        return True
    first = weights[0]
    if (any(type(w) is not nn.Parameter or w.grad is not None or hasattr(w, "device_mesh") for w in weights)
            or any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
                   for w in weights)):
        return False
    with torch.no_grad():
        buffer = torch.cat([w.detach() for w in weights])
        start = 0
        for weight in weights:
            stop = start + weight.shape[0]
            weight.data = buffer[start:stop]
            start = stop
    return packed_weight(weights) is not None


def pack_projections(model: nn.Module) -> int:
    """pack_weights for every module of `model` that asks for it (`fused_projections == "packed"` and a
    `packed_projections()` method giving its groups of layers); the number of groups packed."""
    packed = 0
    for module in model.modules():
        if getattr(module, "fused_projections", None) == "packed" and callable(getattr(module, "packed_projections", None)):
            packed += sum(pack_weights(group) for group in module.packed_projections())
    return packed


def _weight_of(weights: list[torch.Tensor]) -> torch.Tensor:
    weight = packed_weight(weights)
    return torch.cat(weights) if weight is None else weight


@torch.library.custom_op("forgather::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, weights: list[torch.Tensor], weight_grad_as_one: bool) -> torch.Tensor:
    return F.linear(x, _weight_of(weights))


@packed_linear_op.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor], weight_grad_as_one: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], sum(weight.shape[0] for weight in weights)))


@torch.library.custom_op("forgather::packed_linear_backward", mutates_args=())
def packed_linear_backward(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                           weight_grad_as_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input's gradient, every weight's gradient as one [sum of rows, in] tensor)."""
    grad_x = grad.matmul(_weight_of(weights))
    rows, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    if weight_grad_as_one:
        return grad_x, rows.t().mm(inputs)
    grad_weight = rows.new_empty((rows.shape[1], inputs.shape[1]))
    start = 0
    for weight in weights:
        stop = start + weight.shape[0]
        torch.mm(rows[:, start:stop].t(), inputs, out=grad_weight[start:stop])
        start = stop
    return grad_x, grad_weight


@packed_linear_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
      weight_grad_as_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), grad.new_empty((grad.shape[-1], x.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    x, weights, weight_grad_as_one = inputs
    ctx.save_for_backward(x, *weights)
    ctx.rows, ctx.weight_grad_as_one = [weight.shape[0] for weight in weights], weight_grad_as_one


def _backward(ctx, grad: torch.Tensor):
    x, *weights = ctx.saved_tensors
    grad_x, grad_weight = packed_linear_backward(grad, x, weights, ctx.weight_grad_as_one)
    return grad_x, list(grad_weight.split(ctx.rows)), None


packed_linear_op.register_autograd(_backward, setup_context=_setup_context)


def packed_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...], weight_grad_as_one: bool) -> tuple[torch.Tensor, ...]:
    """fused_linear's outputs (bias-free layers), the weights read in place where pack_weights packed them.
    `weight_grad_as_one`: the weights' gradient as one product (q/k/v at the 1.24B shape: 143 us against 150 for
    three, H100) or one a projection (gate/up: 2 x 337 us against 708 for one)."""
    y = packed_linear_op(x, [linear.weight for linear in linears], weight_grad_as_one)
    return y.split([linear.out_features for linear in linears], dim=-1)
