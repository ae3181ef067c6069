"""Triton kernels of the fused residual add + RMSNorm (fused_rms_norm.py holds the ops and the semantics).

Rows are the hidden vectors of the tokens, `[rows, n_cols]` with the columns contiguous; one tile spans a whole
row (BLOCK >= n_cols, the hidden size), so each row's statistics need one pass.
- `_rms_norm_forward`: ROWS rows a program; s = x + delta (when HAS_DELTA; rounded to x's dtype, as torch's add
  is), rstd = 1 / sqrt(mean(s^2) + eps) in fp32, y = weight * (s * rstd rounded to x's dtype). Writes y, s and
  rstd (kept for the backward).
- `_rms_norm_backward`: a fixed number of programs, each walking its share of the rows ROWS at a time. With
  n = s * rstd and m = dy * weight (rounded to x's dtype, as autograd rounds the product):
  ds = rstd * m - rstd^3 * mean(m * s) * s, plus the gradient that reached s itself (the residual stream's, when
  HAS_DS); the weight's gradient sum(dy * n) over the program's rows is kept in fp32 registers and written once
  a program (DW_PARTIAL [programs, n_cols]), then summed over programs by the op.

eps is a kernel constant: a float argument that torch.compile's launcher passes arrives as fp64 (see
packed_attention_kernels.py), which would turn the statistics fp64.

Imported only where a GPU runs the kernels (or TRITON_INTERPRET=1 runs them on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_tile(rows, n_rows, n_cols, BLOCK: tl.constexpr):
    """Column offsets [BLOCK] and the mask [ROWS, BLOCK] of the rows `rows` [ROWS]."""
    cols = tl.arange(0, BLOCK)
    return cols, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _rms_norm_forward(
    X, DELTA, W, Y, S, RSTD,
    sx, sd, sy, ss, n_rows, n_cols,
    eps: tl.constexpr, HAS_DELTA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # row offsets past 2^31 elements
    cols, mask = _row_tile(rows, n_rows, n_cols, BLOCK)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(DELTA + rows[:, None] * sd + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * ss + cols[None, :], x, mask=mask)
    s = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 1) / n_cols + eps)
    normed = (s * rstd[:, None]).to(X.dtype.element_ty)
    weight = tl.load(W + cols, mask=cols < n_cols, other=0.0)
    y = weight.to(tl.float32)[None, :] * normed.to(tl.float32)
    tl.store(Y + rows[:, None] * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_backward(
    DY, DS, S, W, RSTD, DX, DW_PARTIAL,
    sdy, sds, ss, sdx, n_rows, n_cols, rows_per_program,
    HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    weight = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for row in range(first, last, ROWS):
        rows = (row + tl.arange(0, ROWS)).to(tl.int64)
        cols, mask = _row_tile(rows, last, n_cols, BLOCK)
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + rows[:, None] * ss + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < last, other=0.0)
        normed = (s * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)
        dw += tl.sum(dy * normed, 0)
        m = (dy * weight[None, :]).to(S.dtype.element_ty).to(tl.float32)
        correction = rstd * rstd * rstd * tl.sum(m * s, 1) / n_cols
        ds = rstd[:, None] * m - correction[:, None] * s
        if HAS_DS:
            ds += tl.load(DS + rows[:, None] * sds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * sdx + cols[None, :], ds.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program.to(tl.int64) * n_cols + cols, dw, mask=cols < n_cols)
