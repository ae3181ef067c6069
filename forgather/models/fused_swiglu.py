"""SwiGLU's gate, silu(gate) * up, as Triton custom ops on GPUs (`fused_swiglu=true`).

Why kernels of our own, when inductor already makes this one kernel forward and one backward: the step runs at
the GPU's power limit, so what a kernel costs is its energy, not its time, and inductor's gate, on the two
strided halves of one gate/up product, first measured at the power limit (696 W, 0.53 mJ a token;
scripts/bench_energy.py, H100, 2026-12-06). These kernels do the least arithmetic an element that the gate
needs: the sigmoid as one exp2 and one division that is not IEEE-rounded, in fp32, nothing kept from the forward
but its inputs. They are `torch.library.triton_op`s (`forgather::swiglu`, `forgather::swiglu_backward`), which
torch.compile places inside the layer's graph, as fused_rms_norm.py's. Measured since, they are level with
inductor's and Liger's (0.408 mJ a token against 0.418 and 0.399, gate and up as two tensors; the step 0.995x),
so `fused_swiglu` stays off by default (docs/benchmarks.md, "Energy again").

Semantics, `reference_swiglu`'s: (silu(g) * u) in fp32 from g and u, rounded once to g's dtype (as inductor's
compiled kernel rounds; eager torch rounds silu(g) first, so the two agree within a rounding); the gradients
du = dh * silu(g), dg = dh * u * silu'(g), each in fp32 and rounded once, silu'(g) = s + g s (1 - s) with
s = sigmoid(g). The kernels' sigmoid differs from torch's by a few fp32 ulps, far below a bf16 rounding.

`swiglu(gate, up)` takes two tensors of one shape and dtype with the last dimension contiguous (the halves of
one gate/up product are such views); `feedforward.SwiGLU(fused=True)` reaches it through
`triton_ops("fused_swiglu")` (triton_ops.py), which imports this module by name where Triton is installed (exported
standalone code and CPU builds run the torch expression).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_rms_norm import as_rows

# columns a program, warps
SWIGLU_TILING = (2048, 4)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The op's semantics in torch (fp32, rounded once); autograd's gradient of it is the backward's."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return n_rows, -(-n_cols // SWIGLU_TILING[0])


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must have one shape and dtype; got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")


@torch.library.triton_op("forgather::swiglu", mutates_args=())
def _forward_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from torch.library import wrap_triton

    from . import fused_swiglu_kernels as kernels

    _check(gate, up)
    g2, u2 = as_rows(gate), as_rows(up)
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    h2 = h.view(-1, h.shape[-1])
    n_rows, n_cols = g2.shape
    block, warps = SWIGLU_TILING
    wrap_triton(kernels._swiglu_forward)[_grid(n_rows, n_cols)](
        g2, u2, h2, g2.stride(0), u2.stride(0), h2.stride(0), n_cols, BLOCK=block, num_warps=warps)
    return h


@torch.library.triton_op("forgather::swiglu_backward", mutates_args=())
def _backward_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import fused_swiglu_kernels as kernels

    dh2, g2, u2 = as_rows(dh), as_rows(gate), as_rows(up)
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    dg2, du2 = dg.view(-1, dg.shape[-1]), du.view(-1, du.shape[-1])
    n_rows, n_cols = g2.shape
    block, warps = SWIGLU_TILING
    wrap_triton(kernels._swiglu_backward)[_grid(n_rows, n_cols)](
        dh2, g2, u2, dg2, du2, dh2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), n_cols,
        BLOCK=block, num_warps=warps)
    return dg, du


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    return _backward_op(dh, gate, up)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one kernel forward and one backward (module docstring)."""
    return _forward_op(gate, up)
