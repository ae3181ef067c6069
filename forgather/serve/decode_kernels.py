"""Triton kernels of the fused decoder's decode step (decode_attention.py holds their ops and torch semantics).

`decode_attention_kernel` (attention="triton"): one program per (row, kv head, split of the window): it rotates the group's queries and the new key, split 0
writes the new key and value at the row's position, and the program attends over its split's cached keys
(positions below the row's own) with an online softmax, adding the new token from registers in the split
that holds its position; no program reads a position another one writes, so there is no race. With one
split the program writes the output; with more, each writes its (max, sum, weighted values) and the last of
a row's programs to finish (an atomic counter per (row, kv head), reset by that program) combines them:
flash-decoding's split-K without a second launch.

`skinny_matmul_kernel` (matmul="triton" / "fused"): a product of up to 16 rows that streams each weight row
once, optionally with the residual add and norm before it and a SwiGLU's activation after it;
`skinny_matmul` is it autotuned per weight shape.

Both take PDL (a constant): launched under programmatic dependent launch (decode_attention.PDL), a program
waits for the kernel before it at its start, then lets the next kernel launch.

Imported only where a GPU runs the kernel (or TRITON_INTERPRET=1 runs it on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate(x, partner, cos, sin, sign):
    """Rotate-half rotary in float32 of x (its partner lane loaded alongside): x cos + rotate_half(x) sin."""
    return x * cos + sign * partner * sin


@triton.jit
def _residual(X, DELTA, at, inside, dtype):
    """X + DELTA at `at` in float32, rounded to `dtype` (the fused decoder's residual_add)."""
    return (tl.load(X + at, mask=inside, other=0.0).to(tl.float32)
            + tl.load(DELTA + at, mask=inside, other=0.0).to(tl.float32)).to(dtype)


@triton.jit
def _dependent_launch_point(PDL: tl.constexpr, PDL_EARLY: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """Under programmatic dependent launch, wait for the kernel before (its outputs are this one's inputs);
    with PDL_EARLY, then let the next kernel launch at once: its programs may take the SMs' room while they
    wait at their own start (they run only what precedes their wait alongside this one). A split-K grid
    (SPLIT_K > 1: several waves of programs) never releases early: its later waves need those SMs (on the
    H200 the 1.24B down product's split-K grid took the step from 1.05 to 1.30 ms when it did)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL_EARLY:
            if SPLIT_K == 1:
                tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _dependent_release(PDL: tl.constexpr, PDL_EARLY: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """Where _dependent_launch_point did not release: the point after a program's loads where it lets the next
    kernel launch; the next kernel's programs then wait beside this one's last ones only, not beside its later
    waves."""
    if PDL:
        if PDL_EARLY:
            if SPLIT_K > 1:
                tl.extra.cuda.gdc_launch_dependents()
        else:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def decode_attention_kernel(
    Q, K, V, COS, SIN, POS, CACHE, OUT, PART_ACC, PART_ML, COUNTER,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_sin,
    stride_pair, stride_slot, stride_head, stride_pos, stride_ob, stride_oh,
    keys, chunk, scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    PDL_EARLY: tl.constexpr = True, ROPE_TABLE: tl.constexpr = False,
):
    pid = tl.program_id(0)  # row * KV_HEADS + kv head
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row = pid // KV_HEADS
    kv_head = pid % KV_HEADS
    _dependent_launch_point(PDL, PDL_EARLY)
    pos = tl.load(POS + row)
    dtype = CACHE.dtype.element_ty

    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    rope_row = pos if ROPE_TABLE else row  # COS and SIN: a row per position, or per row of the batch
    cos = tl.load(COS + rope_row * stride_cos + d).to(tl.float32)
    sin = tl.load(SIN + rope_row * stride_sin + d).to(tl.float32)
    g = tl.arange(0, GP)
    real = g < GROUP
    heads = kv_head * GROUP + g
    q_rows = Q + row * stride_qb + heads[:, None] * stride_qh
    q_x = tl.load(q_rows + d[None, :], mask=real[:, None], other=0.0).to(tl.float32)
    q_p = tl.load(q_rows + partner[None, :], mask=real[:, None], other=0.0).to(tl.float32)
    q = _rotate(q_x, q_p, cos[None, :], sin[None, :], sign[None, :]).to(dtype)  # [GP, D]
    k_row = K + row * stride_kb + kv_head * stride_kh
    k_new = _rotate(tl.load(k_row + d).to(tl.float32), tl.load(k_row + partner).to(tl.float32), cos, sin, sign)
    k_new = k_new.to(dtype)
    v_new = tl.load(V + row * stride_vb + kv_head * stride_vh + d).to(dtype)
    keys_at = CACHE + row * stride_slot + kv_head * stride_head
    values_at = keys_at + stride_pair
    if split == 0:
        tl.store(keys_at + pos * stride_pos + d, k_new)
        tl.store(values_at + pos * stride_pos + d, v_new)

    # Cached keys are the positions below the row's own, within the window; the new one is in registers.
    cached = tl.minimum(pos, keys)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, cached)
    m = tl.full([GP], -1.0e30, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        at = start + n
        valid = at < hi
        # Both loads issued before any arithmetic: a split is usually one block, and its time is their latency.
        key_block = tl.load(keys_at + at[:, None] * stride_pos + d[None, :], mask=valid[:, None], other=0.0)
        value_block = tl.load(values_at + at[:, None] * stride_pos + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(key_block), input_precision=PRECISION) * scale  # [GP, BLOCK_N], float32
        s = tl.where(valid[None, :], s, -1.0e30)
        m_next = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_next)
        p = tl.exp(s - m_next[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), value_block, input_precision=PRECISION)
        m = m_next
    _dependent_release(PDL, PDL_EARLY)
    if (pos < keys) & (pos // chunk == split):
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale  # [GP]
        m_next = tl.maximum(m, s_new)
        alpha = tl.exp(m - m_next)
        p_new = tl.exp(s_new - m_next)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m = m_next

    out = OUT + row * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if splits == 1:
        tl.store(out, (acc / l[:, None]).to(dtype), mask=real[:, None])
    else:
        part = pid * MAX_SPLITS + split
        tl.store(PART_ACC + part * GP * D + g[:, None] * D + d[None, :], acc)
        tl.store(PART_ML + part * 2 * GP + g, m)
        tl.store(PART_ML + part * 2 * GP + GP + g, l)
        tl.debug_barrier()  # every thread's partials stored before the release below
        done = tl.atomic_add(COUNTER + pid, 1, sem="acq_rel")
        if done == splits - 1:  # the last of this (row, kv head)'s programs: combine every split
            m_all = tl.full([GP], -1.0e30, tl.float32)
            l_all = tl.zeros([GP], tl.float32)
            acc_all = tl.zeros([GP, D], tl.float32)
            for other in range(0, splits):
                part = pid * MAX_SPLITS + other
                m_s = tl.load(PART_ML + part * 2 * GP + g, cache_modifier=".cg")
                l_s = tl.load(PART_ML + part * 2 * GP + GP + g, cache_modifier=".cg")
                acc_s = tl.load(PART_ACC + part * GP * D + g[:, None] * D + d[None, :], cache_modifier=".cg")
                m_next = tl.maximum(m_all, m_s)
                old, new = tl.exp(m_all - m_next), tl.exp(m_s - m_next)
                l_all = l_all * old + l_s * new
                acc_all = acc_all * old[:, None] + acc_s * new[:, None]
                m_all = m_next
            tl.store(out, (acc_all / l_all[:, None]).to(dtype), mask=real[:, None])
            tl.atomic_xchg(COUNTER + pid, 0)


@triton.jit
def _skinny_finish(acc, acc_up, BIAS, Y, n, m, rows, N, stride_ym, HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
    """The skinny product's epilogue: bias, the SwiGLU when GATED, the store of Y's [M_PAD, BLOCK_N] tile."""
    dtype = Y.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(BIAS + N + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(dtype)
    if GATED:
        gate = y.to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        y = (activated * acc_up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(Y + m[:, None] * stride_ym + n[None, :], y, mask=rows & (n[None, :] < N))


@triton.jit
def skinny_matmul_kernel(
    X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, DELTA, NORM_WEIGHT, X_OUT, eps, PARTIAL, COUNTER,
    HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, PRECISION: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
    PDL: tl.constexpr = False, SPLIT_K: tl.constexpr = 1, PDL_EARLY: tl.constexpr = True,
):
    """Y [M, N] = A [M, K] @ W [N, K]^T (+ bias) for M <= M_PAD: each program streams BLOCK_N rows of W
    (contiguous along K) once, for every row; float32 accumulation. A is X [M, K], or with
    - NORM: rms_norm(X + DELTA) * NORM_WEIGHT, the residual add in float32 rounded to X's dtype (written to
      X_OUT by the first program), the norm's statistics in float32, cast back before the weight (forgather's
      rms_norm); every program recomputes the rows' statistics (a few KB from L2);
    and with GATED, W [2N, K] holds a SwiGLU's gate rows then its up rows: each program streams BLOCK_N rows of
    both halves and Y = silu(gate) * up, each rounded to Y's dtype as torch's ops round (the activation in the
    product's epilogue: computing it on the down product's input instead redid it in every program, 5x slower
    than cuBLAS plus a pointwise kernel on the H200). PDL: launched under programmatic dependent launch
    (decode_attention.PDL).

    SPLIT_K > 1 (split-K, for products whose N alone makes too few programs: the 1.24B layer's output and
    down products have 128 tiles of 16 rows for 132 SMs): program (tile, split) sums the split's share of K,
    stores its float32 tile in PARTIAL [SPLIT_K, M_PAD, N (2N when GATED)], and the last of a tile's
    programs to finish (an atomic counter per tile in COUNTER, reset by that program) adds the splits in
    their order (the result does not depend on which finished last) and runs the epilogue."""
    _dependent_launch_point(PDL, PDL_EARLY, SPLIT_K)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    rows = m[:, None] < M
    dtype = Y.dtype.element_ty
    if NORM:
        squares = tl.zeros([M_PAD], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            at = m[:, None] * stride_xm + k[None, :]
            inside = rows & (k[None, :] < K)
            x = _residual(X, DELTA, at, inside, dtype)
            if (pid == 0) & (split == 0):
                tl.store(X_OUT + at, x, mask=inside)
            x = x.to(tl.float32)
            squares += tl.sum(x * x, 1)
        inverse_rms = 1.0 / tl.sqrt(squares / K + eps)
    chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * chunk
    k_stop = tl.minimum(k_start + chunk, K)
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w_at = n[:, None] * stride_wn + k[None, :]
        w_inside = (n[:, None] < N) & (k[None, :] < K)
        if EVEN:
            w = tl.load(W + w_at)
        else:
            w = tl.load(W + w_at, mask=w_inside, other=0.0)
        at = m[:, None] * stride_xm + k[None, :]
        inside = rows & (k[None, :] < K)
        if NORM:
            x = _residual(X, DELTA, at, inside, dtype).to(tl.float32)
            normed = (x * inverse_rms[:, None]).to(dtype).to(tl.float32)
            x = (normed * tl.load(NORM_WEIGHT + k, mask=k < K, other=0.0).to(tl.float32)[None, :]).to(dtype)
        else:
            x = tl.load(X + at, mask=inside, other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if GATED:
            if EVEN:
                w_up = tl.load(W + N * stride_wn + w_at)
            else:
                w_up = tl.load(W + N * stride_wn + w_at, mask=w_inside, other=0.0)
            acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
    _dependent_release(PDL, PDL_EARLY, SPLIT_K)
    if SPLIT_K == 1:
        _skinny_finish(acc, acc_up, BIAS, Y, n, m, rows, N, stride_ym, HAS_BIAS, GATED)
    else:
        width = 2 * N if GATED else N
        tile = PARTIAL + m[:, None] * width + n[None, :]
        in_tile = n[None, :] < N
        tl.store(tile + split * M_PAD * width, acc, mask=in_tile)
        if GATED:
            tl.store(tile + split * M_PAD * width + N, acc_up, mask=in_tile)
        tl.debug_barrier()  # every thread's partial stored before the release below
        done = tl.atomic_add(COUNTER + pid, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last of this tile's programs: add the splits in order, then finish
            acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            acc_up = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            for other in range(0, SPLIT_K):
                acc += tl.load(tile + other * M_PAD * width, mask=in_tile, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(tile + other * M_PAD * width + N, mask=in_tile, other=0.0,
                                      cache_modifier=".cg")
            _skinny_finish(acc, acc_up, BIAS, Y, n, m, rows, N, stride_ym, HAS_BIAS, GATED)
            tl.atomic_xchg(COUNTER + pid, 0)


def _skinny_configs(split: bool) -> list:
    """decode_attention.skinny_tilings as the autotuner's configs."""
    from .decode_attention import skinny_tilings

    configs = []
    for tiling in skinny_tilings(split):
        tiling = dict(tiling)
        num_warps, num_stages = tiling.pop("num_warps"), tiling.pop("num_stages")
        configs.append(triton.Config(tiling, num_warps=num_warps, num_stages=num_stages))
    return configs


class _Skinny:
    """skinny_matmul_kernel autotuned once per weight shape (N, K) and dtype; the grid follows the config."""

    def __init__(self, split: bool):
        key = ["N", "K", "NORM", "GATED", "PDL", "PDL_EARLY"]
        self.tuned = triton.autotune(configs=_skinny_configs(split), key=key)(
            triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0})(
                skinny_matmul_kernel))

    def __call__(self, *args, launch_pdl: bool = False, **constants):
        outputs = args[5]  # N
        grid = lambda meta: (triton.cdiv(outputs, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))  # noqa: E731
        if launch_pdl:
            self.tuned[grid](*args, launch_pdl=True, **constants)
        else:
            self.tuned[grid](*args, **constants)


# The norm + product kernels (the default "fused" products: q/k/v and gate/up, whose many output tiles fill the
# GPU; a split would recompute the norm's statistics in every split) tune among whole-K tilings only; the plain
# products (output and down in "fused_all", all four in "triton") also among split-K ones.
skinny_matmul = _Skinny(split=False)
skinny_matmul_split = _Skinny(split=True)


@triton.jit
def advance_kernel(INPUTS, GREEDY, HOST, B, SCRATCH, BLOCK: tl.constexpr):
    """The decode step's last launch (decode_attention.advance_inputs): the step's greedy tokens become the next
    step's ids, each position but the scratch one moves on by one (INPUTS [2, B]: ids, then positions), and the
    tokens are stored in HOST, pinned host memory that the GPU writes directly (no copy engine, no launch
    between two steps)."""
    offsets = tl.arange(0, BLOCK)
    inside = offsets < B
    tokens = tl.load(GREEDY + offsets, mask=inside)
    positions = tl.load(INPUTS + B + offsets, mask=inside)
    tl.store(INPUTS + offsets, tokens, mask=inside)
    tl.store(INPUTS + B + offsets, tl.where(positions == SCRATCH, positions, positions + 1), mask=inside)
    tl.store(HOST + offsets, tokens, mask=inside)


@triton.jit
def greedy_advance_kernel(LOGITS, TOPS, INDICES, COUNTER, INPUTS, GREEDY, HOST, B, V, C, stride_logits, SCRATCH,
                          CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """decode_attention.greedy_advance, a program per (row, chunk of CHUNK logits): each stores its chunk's
    maximum and the first index of it; the last of a row's programs to finish (an atomic counter per row, reset
    by that program) takes the first chunk holding the row's maximum (fused.chunked_argmax: argmax's first
    index) and makes advance_kernel's writes for the row, the greedy id also to GREEDY."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    at = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(LOGITS + row * stride_logits + at, mask=at < V, other=float("-inf")).to(tl.float32)
    tl.store(TOPS + row * C + chunk, tl.max(values, 0))
    tl.store(INDICES + row * C + chunk, chunk * CHUNK + tl.argmax(values, 0, tie_break_left=True))
    tl.debug_barrier()  # the stores before the release below
    done = tl.atomic_add(COUNTER + row, 1, sem="acq_rel")
    if done == C - 1:
        c = tl.arange(0, BLOCK_C)
        tops = tl.load(TOPS + row * C + c, mask=c < C, other=float("-inf"), cache_modifier=".cg")
        best = tl.argmax(tops, 0, tie_break_left=True)
        token = tl.load(INDICES + row * C + best, cache_modifier=".cg").to(tl.int64)
        position = tl.load(INPUTS + B + row)
        tl.store(GREEDY + row, token)
        tl.store(INPUTS + row, token)
        tl.store(INPUTS + B + row, tl.where(position == SCRATCH, position, position + 1))
        tl.store(HOST + row, token)
        tl.atomic_xchg(COUNTER + row, 0)
