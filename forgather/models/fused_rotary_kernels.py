"""Triton kernels of the fused q/k/v product's rotary embedding (fused_rotary.py holds the ops and the semantics).

A program takes BLOCK_T tokens of one batch row and one head of the product's H + 2 KV heads (grid: heads, token
blocks, batch rows: programs launched together cover whole rows of the product), and handles the head's two halves
of HALF values as [BLOCK_T, BLOCK_HALF] tiles (BLOCK_HALF the power of two at or above HALF), so loads and stores
run along the head dimension, contiguous in every tensor. Heads below H are queries, the next KV keys (both
rotated), the last KV values (copied).
- `_rotary_qkv_forward`: the product's head -> q, k or v [B, T, heads, D] (strides per batch row and token).
- `_rotary_qkv_backward`: the gradient of q, k or v [B, heads, T, D] (any strides, D contiguous) -> its head's
  place in the product's gradient [B, T, (H + 2 KV) x D], turned back through the rotation.
cos and sin are rounded to the activations' dtype before use, as apply_rotary rounds them; the arithmetic is fp32.

Imported only where a GPU runs the kernels (or TRITON_INTERPRET=1 runs them on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block(T, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's head h, batch row b, tokens t [BLOCK_T], columns d [1, BLOCK_HALF] of a half, and the mask
    of the tile's elements inside the tensors."""
    h = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    return h, b, t, d, (t < T)[:, None] & (d < HALF)


@triton.jit
def _tables(COS, SIN, b, t, d, sc_b, sc_t, ss_b, ss_t, mask, DTYPE: tl.constexpr, HALF: tl.constexpr):
    """cos and sin of tokens t [BLOCK_T] of batch row b as halves (c1, c2, s1, s2), [BLOCK_T, BLOCK_HALF] fp32
    each, rounded to DTYPE first."""
    c = COS + b * sc_b + t[:, None] * sc_t + d
    s = SIN + b * ss_b + t[:, None] * ss_t + d
    c1 = tl.load(c, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    c2 = tl.load(c + HALF, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    s1 = tl.load(s, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    s2 = tl.load(s + HALF, mask=mask, other=0.0).to(DTYPE).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rotary_qkv_forward(
    X, COS, SIN, Q, K, V,
    sx_b, sx_t, sc_b, sc_t, ss_b, ss_t, sq_b, sq_t, sk_b, sk_t,
    T, heads, kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
):
    h, b, t, d, mask = _block(T, HALF, BLOCK_HALF, BLOCK_T)
    src = X + b * sx_b + t[:, None] * sx_t + h * (2 * HALF) + d
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    if h < heads + kv_heads:
        c1, c2, s1, s2 = _tables(COS, SIN, b, t, d, sc_b, sc_t, ss_b, ss_t, mask, X.dtype.element_ty, HALF)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = (f1 * c1 - f2 * s1).to(X.dtype.element_ty)
        o2 = (f2 * c2 + f1 * s2).to(X.dtype.element_ty)
        if h < heads:
            dst = Q + b * sq_b + t[:, None] * sq_t + h * (2 * HALF) + d
        else:
            dst = K + b * sk_b + t[:, None] * sk_t + (h - heads) * (2 * HALF) + d
        tl.store(dst, o1, mask=mask)
        tl.store(dst + HALF, o2, mask=mask)
    else:  # V is stored as K is
        dst = V + b * sk_b + t[:, None] * sk_t + (h - heads - kv_heads) * (2 * HALF) + d
        tl.store(dst, x1, mask=mask)
        tl.store(dst + HALF, x2, mask=mask)


@triton.jit
def _rotary_qkv_backward(
    DQ, DK, DV, COS, SIN, DX,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_t, ss_b, ss_t, sx_b, sx_t,
    T, heads, kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
):
    h, b, t, d, mask = _block(T, HALF, BLOCK_HALF, BLOCK_T)
    dst = DX + b * sx_b + t[:, None] * sx_t + h * (2 * HALF) + d
    if h < heads + kv_heads:
        if h < heads:
            src = DQ + b * sq_b + h * sq_h + t[:, None] * sq_t + d
        else:
            src = DK + b * sk_b + (h - heads) * sk_h + t[:, None] * sk_t + d
        g1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        c1, c2, s1, s2 = _tables(COS, SIN, b, t, d, sc_b, sc_t, ss_b, ss_t, mask, DX.dtype.element_ty, HALF)
        tl.store(dst, (g1 * c1 + g2 * s2).to(DX.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (g2 * c2 - g1 * s1).to(DX.dtype.element_ty), mask=mask)
    else:
        src = DV + b * sv_b + (h - heads - kv_heads) * sv_h + t[:, None] * sv_t + d
        tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)
        tl.store(dst + HALF, tl.load(src + HALF, mask=mask, other=0.0), mask=mask)
