"""Triton kernels for one factored Adafactor step on a contiguous 2-D parameter X [n, m] (math: adafactor.py).

Passes over memory per step (fp32, N elements: 4N bytes per pass), the fewest the math allows:
  1. `grad_sq_sums`   read G            row sums and column sums of G^2 (fp32 atomics into a workspace)
  2. `finalize`       n + m values      R, C <- lerp(...); 1 / max(mean R, eps1); zero this step's |X|^2 slot
  3. `update_sq_sum`  read G            sum of U^2 over the tensor, for the clipping RMS(U)
  4. `apply_update`   read G, X (M)     X <- X (1 - lr wd) - alpha U / max(1, RMS(U)/d); write X (M);
                      write X (M)       also sums the new X^2, so the next step's RMS(X) costs no pass;
                                        bf16 X is rounded stochastically (rounding.py, same bits)
Clipping needs RMS(U) before any X is written, and U needs R and C, which need all of G: so G is read three
times, X once, and X written once; 5 passes in all (7 with the first moment M). Pass 3 runs backwards
(`serpentine`), so each re-read of G starts on the tiles the previous pass left in L2. Passes 1, 3 and 4 tile the
tensor in BLOCK_N x BLOCK_M tiles, and each program walks down ROWS_PER_PROGRAM rows of one column stripe, so
column partial sums stay in registers and only a few atomics per program reach memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Measured best of the tilings tried on an H100 (docs/benchmarks.md, "Adafactor"); TritonAdafactor(tile=...)
# overrides them.
BLOCK_N = 16
BLOCK_M = 512
ROWS_PER_PROGRAM = 32
NUM_WARPS = 4
FINALIZE_BLOCK = 1024


@triton.jit
def _tile(program_row0, row_step, pid_m, n, m, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = program_row0 + row_step + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < n) & (cols[None, :] < m)
    offsets = rows[:, None].to(tl.int64) * m + cols[None, :]
    return rows, cols, mask, offsets


@triton.jit
def grad_sq_sums(
    G, row_sum, col_sum, n, m,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row0 = tl.program_id(1) * ROWS_PER_PROGRAM
    col_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for row_step in range(0, ROWS_PER_PROGRAM, BLOCK_N):
        rows, cols, mask, offsets = _tile(row0, row_step, pid_m, n, m, BLOCK_N, BLOCK_M)
        g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
        g2 = g * g
        tl.atomic_add(row_sum + rows, tl.sum(g2, axis=1), mask=rows < n, sem="relaxed")
        col_acc += tl.sum(g2, axis=0)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.atomic_add(col_sum + cols, col_acc, mask=cols < m, sem="relaxed")


@triton.jit
def finalize(
    row_var, col_var, row_sum, col_sum, inv_row_mean, param_sq, n, m, one_minus_beta2, eps1, cur_slot,
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < n
        r = tl.load(row_var + idx, mask=mask, other=0.0)
        r += one_minus_beta2 * (tl.load(row_sum + idx, mask=mask, other=0.0) / m - r)
        tl.store(row_var + idx, r, mask=mask)
        acc += r
    tl.store(inv_row_mean, 1.0 / tl.maximum(tl.sum(acc) / n, eps1))
    for start in range(0, m, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < m
        c = tl.load(col_var + idx, mask=mask, other=0.0)
        c += one_minus_beta2 * (tl.load(col_sum + idx, mask=mask, other=0.0) / n - c)
        tl.store(col_var + idx, c, mask=mask)
    tl.store(param_sq + cur_slot, 0.0)


@triton.jit
def _factored_update(G, row_var, col_var, inv_row_mean, rows, cols, mask, offsets, n, m, eps1):
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(row_var + rows, mask=rows < n, other=1.0) * tl.load(inv_row_mean)
    c = tl.load(col_var + cols, mask=cols < m, other=1.0)
    v = tl.maximum(r[:, None] * c[None, :], eps1 * eps1)
    return g * tl.math.rsqrt(v)


@triton.jit
def update_sq_sum(
    G, row_var, col_var, inv_row_mean, update_sq, n, m, eps1,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, REVERSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if REVERSE:
        # Walk the tensor backwards: start on the tiles pass 1 read last, still in L2, and end on the
        # tiles pass 4 reads first.
        pid_m = tl.num_programs(0) - 1 - pid_m
        pid_n = tl.num_programs(1) - 1 - pid_n
    row0 = pid_n * ROWS_PER_PROGRAM
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for row_step in range(0, ROWS_PER_PROGRAM, BLOCK_N):
        rows, cols, mask, offsets = _tile(row0, row_step, pid_m, n, m, BLOCK_N, BLOCK_M)
        u = _factored_update(G, row_var, col_var, inv_row_mean, rows, cols, mask, offsets, n, m, eps1)
        acc += tl.where(mask, u * u, 0.0)
    tl.atomic_add(update_sq, tl.sum(acc), sem="relaxed")


@triton.jit
def _hash32(h):
    # lowbias32 on uint32 (products wrap); forgather/optim/rounding.py's hash32, bit for bit.
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _stochastic_round_bits(x, offsets, seed):
    # rounding.py's stochastic_round_to_bf16: the fp32 value whose top 16 bits the bf16 result keeps.
    bits = x.to(tl.uint32, bitcast=True)
    key = _hash32(offsets.to(tl.uint32) ^ seed.to(tl.uint32))
    noise = _hash32(key ^ bits) & 0xFFFF
    return ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["seed"])  # a new seed each step must not mean a new compilation
def apply_update(
    X, G, M, row_var, col_var, inv_row_mean, update_sq, param_sq, n, m, inv_numel, eps1, eps2, rho, d, decay,
    one_minus_beta1, prev_slot, cur_slot, seed,
    SCALE_PARAMETER: tl.constexpr, HAS_MOMENT: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row0 = tl.program_id(1) * ROWS_PER_PROGRAM
    clip = 1.0 / tl.maximum(1.0, tl.sqrt(tl.load(update_sq) * inv_numel) / d)
    alpha = rho
    if SCALE_PARAMETER:
        alpha = rho * tl.maximum(eps2, tl.sqrt(tl.load(param_sq + prev_slot) * inv_numel))
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for row_step in range(0, ROWS_PER_PROGRAM, BLOCK_N):
        rows, cols, mask, offsets = _tile(row0, row_step, pid_m, n, m, BLOCK_N, BLOCK_M)
        u = _factored_update(G, row_var, col_var, inv_row_mean, rows, cols, mask, offsets, n, m, eps1) * clip
        if HAS_MOMENT:
            moment = tl.load(M + offsets, mask=mask, other=0.0).to(tl.float32)
            u = moment + one_minus_beta1 * (u - moment)
            u = u.to(M.dtype.element_ty)
            tl.store(M + offsets, u, mask=mask)
            u = u.to(tl.float32)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) * decay - alpha * u
        if STOCHASTIC_ROUNDING:
            x = _stochastic_round_bits(x, offsets, seed)
        x = x.to(X.dtype.element_ty)
        tl.store(X + offsets, x, mask=mask)
        xf = x.to(tl.float32)
        acc += tl.where(mask, xf * xf, 0.0)
    tl.atomic_add(param_sq + cur_slot, tl.sum(acc), sem="relaxed")
