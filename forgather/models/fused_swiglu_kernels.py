"""Triton kernels of SwiGLU's gate, silu(gate) * up (fused_swiglu.py holds the ops and the semantics).

Gate and up are [rows, n_cols] with the columns contiguous and a stride a row each (so that the two halves of
one gate/up product, views of one tensor, need no copy). A program takes BLOCK columns of one row. The sigmoid
is 1 / (1 + 2^(-x log2 e)) in fp32: the hardware's exp2 and an approximate division (div.approx.f32, within 2
ulp, where this Triton offers it), against bf16 outputs (one bf16 rounding is 2^-8: these errors are ~2^-22).
- `_swiglu_forward`: h = silu(g) * u in fp32, rounded once.
- `_swiglu_backward`: from dh, g, u: du = dh * silu(g), dg = dh * u * sig(g) * (1 + g * (1 - sig(g))), each
  in fp32, rounded once. The sigmoid is recomputed, not kept: the forward writes only h.

Imported only where a GPU runs the kernels (or TRITON_INTERPRET=1 runs them on CPU tensors).
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel reads must be a constexpr instance


@triton.jit
def _tile(row_stride, n_cols, BLOCK: tl.constexpr):
    """This program's element offsets [BLOCK] in a tensor of `row_stride`, and the mask of its columns."""
    row = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row * row_stride + cols, cols < n_cols


if "approx" in inspect.signature(tl.math.fdiv).parameters:  # Triton >= 3.6: div.approx.f32, within 2 ulp
    @triton.jit
    def _sigmoid(x):
        return tl.math.fdiv(1.0, 1.0 + tl.exp2(-x * LOG2E), approx=True)
else:
    @triton.jit
    def _sigmoid(x):
        return tl.math.fdiv(1.0, 1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _swiglu_forward(G, U, H, sg, su, sh, n_cols, BLOCK: tl.constexpr):
    g_at, mask = _tile(sg, n_cols, BLOCK)
    u_at, _ = _tile(su, n_cols, BLOCK)
    h_at, _ = _tile(sh, n_cols, BLOCK)
    g = tl.load(G + g_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + h_at, (g * _sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(DH, G, U, DG, DU, sdh, sg, su, sdg, sdu, n_cols, BLOCK: tl.constexpr):
    dh_at, mask = _tile(sdh, n_cols, BLOCK)
    g_at, _ = _tile(sg, n_cols, BLOCK)
    u_at, _ = _tile(su, n_cols, BLOCK)
    dg_at, _ = _tile(sdg, n_cols, BLOCK)
    du_at, _ = _tile(sdu, n_cols, BLOCK)
    dh = tl.load(DH + dh_at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + g_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_at, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    tl.store(DU + du_at, (dh * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + dg_at, (dh * u * (sig + silu * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
