"""Triton kernels of packed-document attention (packed_attention.py holds the ops, the layout and the semantics).

A query at position t of a row sees the keys from the start of its document up to itself: `start[t] <= j <= t`.
Documents are contiguous runs, so each block of queries needs only the keys from its first query's document
start to its last query, and each block of keys only the queries from its first key to the end of its last
key's document. The grouped-query heads that share a key/value head are stacked into one program's rows
(GROUP x BLOCK_M rows): each key and value tile is loaded once for the whole group, and the key/value gradients
of a group are summed inside one program, with no atomics.

Only the tiles at a loop's ends, which hold a document boundary or the diagonal, take the mask; the stretch
between them [mid_lo, mid_hi), where every row sees every key of the tile (inside one long document, most of the
work), skips it. For the forward and dq: key tiles at or after the last query's document start and at or before
the first query; for dk/dv: query blocks after the last key and inside the first key's document. The forward
and dk/dv walk all their tiles in one loop with the mask under a run-time branch: three loops, one a stretch,
took the forward from ~124 registers to ~163 and dk/dv from ~214 to ~243 (scripts/packed_kernel_registers.py),
fewer programs an SM. dq, at ~92 registers, keeps its three loops.

Programs are handed out heaviest first (`_program`): a program's work depends on where its block sits in its
document, and in the grid's plain order the long programs of the last (batch row, kv head) pairs started last
and ran alone (scripts/packed_schedule.py models it; 1.24x on the attention of the training bench's rows,
docs/benchmarks.md).

Three kernels, all over grid (row blocks, batch x kv heads):
- `_packed_attention_forward`: online softmax over the key blocks; writes the output and the log2-sum-exp of
  each query row.
- `_packed_attention_dq`: the queries' gradient; first writes delta = rowsum(dO * O), which the next reads.
- `_packed_attention_dkdv`: the keys' and values' gradients, walking the query blocks that see the key block.
(Named for the profile, whose kernel categories match "attention", scripts/profile_train.py.)

The scales are constants of each compiled kernel (a float argument that torch.compile passes through its own
launcher arrives as fp64 and turned the scores fp64), and so is the products' precision: IEEE fp32 for fp32
tensors (Triton's default, TF32, was 1e-3 off in the tests), the tensor cores' own for bf16 / fp16.

Scores are kept in the log2 domain (scale * log2(e) folded into one factor), as flash attention's Triton
kernels do. A masked score is a large negative finite number rather than -inf, so a block whose keys are all
hidden from a row leaves no NaN: its weights are erased by the first block that holds a visible key (every
row sees at least itself).

Imported only where a GPU runs the kernels (or TRITON_INTERPRET=1 runs them on CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl

_HIDDEN = tl.constexpr(-1.0e30)  # a masked score, in the log2 domain


@triton.jit
def _program(kv_heads, HEAVY_LAST_BLOCKS: tl.constexpr):
    """This program's block along the row, its batch row and its kv head. The GPU starts programs in the grid's
    order (axis 0 fastest); they are handed out so that each block index runs for every (batch row, kv head)
    before the next, the blocks that carry the most work in a long document first: the last query blocks for the
    forward and dq (HEAVY_LAST_BLOCKS), the first key blocks for dk/dv. The longest programs then start early
    instead of trailing behind the rest."""
    blocks = tl.num_programs(0)
    pairs = tl.num_programs(1)
    order = tl.program_id(1) * blocks + tl.program_id(0)
    rank = order // pairs
    pair = order % pairs
    if HEAVY_LAST_BLOCKS:
        rank = blocks - 1 - rank
    return rank, pair // kv_heads, pair % kv_heads


@triton.jit
def _group_rows(block, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, T):
    """The stacked rows of one query block: (head within the group, token position, inside the row) each
    [GROUP * BLOCK_M]."""
    rows = tl.arange(0, GROUP * BLOCK_M)
    head = rows // BLOCK_M
    token = block * BLOCK_M + rows % BLOCK_M
    return head, token, token < T


@triton.jit
def _rows_at(X, b, heads, token, sxb, sxh, sxt, HEAD_DIM: tl.constexpr):
    """Addresses [rows, HEAD_DIM] of stacked rows: query heads `heads` at positions `token`."""
    dims = tl.arange(0, HEAD_DIM)
    return X + b * sxb + heads[:, None] * sxh + token[:, None] * sxt + dims[None, :]


@triton.jit
def _tile_at(X, b, h, keys, sxb, sxh, sxt, HEAD_DIM: tl.constexpr):
    """Addresses [BLOCK_N, HEAD_DIM] of kv head h's tile at positions `keys`."""
    dims = tl.arange(0, HEAD_DIM)
    return X + b * sxb + h * sxh + keys[:, None] * sxt + dims[None, :]


@triton.jit
def _key_tiles(K, V, b, h, n, skb, skh, skt, svb, svh, svt, T, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The key positions of the tile at n, and kv head h's key and value tiles there (zeros past the row)."""
    keys = n + tl.arange(0, BLOCK_N)
    k = tl.load(_tile_at(K, b, h, keys, skb, skh, skt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
    v = tl.load(_tile_at(V, b, h, keys, svb, svh, svt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
    return keys, k, v


@triton.jit
def _visible(keys, start, token):
    """Whether a query at `token`, its document starting at `start`, sees the key at `keys`, broadcast: the forward
    and dq pass [rows, keys] shapes, dk/dv [keys, rows]."""
    return (keys >= start) & (keys <= token)


@triton.jit
def _key_range(START, ssb, b, block, token, inside, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each of a query block's rows' document start, and the key tiles the block visits: [first, last) from its
    first query's document start (down to a tile boundary) to its last query, and inside it the tiles every row
    sees whole, [mid_lo, mid_hi): at or after the last query's document start and at or before the first query."""
    start = tl.load(START + b * ssb + token, mask=inside, other=0)
    first = tl.load(START + b * ssb + block * BLOCK_M) // BLOCK_N * BLOCK_N
    last = tl.minimum(block * BLOCK_M + BLOCK_M, T)
    start_last = tl.load(START + b * ssb + last - 1)
    mid_lo, mid_hi = _middle(first, last, tl.cdiv(start_last, BLOCK_N) * BLOCK_N,
                             (block * BLOCK_M + 1) // BLOCK_N * BLOCK_N)
    return start, first, mid_lo, mid_hi, last


@triton.jit
def _middle(lo, hi, a, b):
    """The part of [lo, hi) inside [a, b), as mid_lo <= mid_hi with lo <= mid_lo and mid_hi <= hi: the loop runs
    [lo, mid_lo) and [mid_hi, hi) with the mask and [mid_lo, mid_hi) without it."""
    mid_lo = tl.minimum(tl.maximum(lo, a), hi)
    return mid_lo, tl.minimum(tl.maximum(mid_lo, b), hi)


@triton.jit
def _forward_tiles(acc, l_i, m_i, q, K, V, b, h, start, token, lo, hi, mid_lo, mid_hi, skb, skh, skt, svb, svh,
                   svt, T, qk_scale: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
    """The online softmax over the key tiles [lo, hi); inside [mid_lo, mid_hi) every row sees every key of them."""
    for n in range(lo, hi, BLOCK_N):
        keys, k, v = _key_tiles(K, V, b, h, n, skb, skh, skt, svb, svh, svt, T, BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if (n < mid_lo) | (n >= mid_hi):
            s = tl.where(_visible(keys[None, :], start[:, None], token[:, None]), s, _HIDDEN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _packed_attention_forward(
    Q, K, V, O, LSE, START,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, ssb,
    T, kv_heads, qk_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads, True)
    head, token, inside = _group_rows(block, GROUP, BLOCK_M, T)
    qh = h * GROUP + head
    q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
    start, first, mid_lo, mid_hi, last = _key_range(START, ssb, b, block, token, inside, T, BLOCK_M, BLOCK_N)
    m_i = tl.full([GROUP * BLOCK_M], _HIDDEN, tl.float32)
    l_i = tl.zeros([GROUP * BLOCK_M], tl.float32)
    acc = tl.zeros([GROUP * BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _forward_tiles(acc, l_i, m_i, q, K, V, b, h, start, token, first, last, mid_lo, mid_hi, skb,
                                   skh, skt, svb, svh, svt, T, qk_scale, PRECISION, BLOCK_N, HEAD_DIM)
    tl.store(_rows_at(O, b, qh, token, sob, soh, sot, HEAD_DIM), (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=inside[:, None])
    tl.store(LSE + b * slb + qh * slh + token, m_i + tl.math.log2(l_i), mask=inside)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, b, h, start, token, lo, hi, skb, skh, skt, svb, svh, svt, T,
              qk_scale: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASKED: tl.constexpr):
    """The queries' gradient over the key tiles [lo, hi); without MASKED every row sees every key of them."""
    for n in range(lo, hi, BLOCK_N):
        keys, k, v = _key_tiles(K, V, b, h, n, skb, skh, skt, svb, svh, svt, T, BLOCK_N, HEAD_DIM)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(keys[None, :], start[:, None], token[:, None]), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _packed_attention_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, START,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt, slb, slh, ssb,
    T, kv_heads, qk_scale: tl.constexpr, sm_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads, True)
    head, token, inside = _group_rows(block, GROUP, BLOCK_M, T)
    qh = h * GROUP + head
    q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
    do = tl.load(_rows_at(DO, b, qh, token, sdob, sdoh, sdot, HEAD_DIM), mask=inside[:, None], other=0.0)
    o = tl.load(_rows_at(O, b, qh, token, sob, soh, sot, HEAD_DIM), mask=inside[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * slb + qh * slh + token, delta, mask=inside)
    lse = tl.load(LSE + b * slb + qh * slh + token, mask=inside, other=0.0)
    start, first, mid_lo, mid_hi, last = _key_range(START, ssb, b, block, token, inside, T, BLOCK_M, BLOCK_N)
    dq = tl.zeros([GROUP * BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, h, start, token, first, mid_lo, skb, skh, skt, svb, svh, svt, T,
                   qk_scale, PRECISION, BLOCK_N, HEAD_DIM, True)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, h, start, token, mid_lo, mid_hi, skb, skh, skt, svb, svh, svt, T,
                   qk_scale, PRECISION, BLOCK_N, HEAD_DIM, False)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, b, h, start, token, mid_hi, last, skb, skh, skt, svb, svh, svt, T,
                   qk_scale, PRECISION, BLOCK_N, HEAD_DIM, True)
    tl.store(_rows_at(DQ, b, qh, token, sdqb, sdqh, sdqt, HEAD_DIM), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=inside[:, None])


@triton.jit
def _dkdv_tiles(dk, dv, k, v, keys, Q, DO, LSE, DELTA, START, b, h, lo, hi, mid_lo, mid_hi, sqb, sqh, sqt, sdob,
                sdoh, sdot, slb, slh, ssb, T, qk_scale: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The keys' and values' gradients over the query blocks [lo, hi); inside [mid_lo, mid_hi) every row of them
    sees every key of the tile."""
    for m in range(lo, hi):
        head, token, inside = _group_rows(m, GROUP, BLOCK_M, T)
        qh = h * GROUP + head
        q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
        do = tl.load(_rows_at(DO, b, qh, token, sdob, sdoh, sdot, HEAD_DIM), mask=inside[:, None], other=0.0)
        lse = tl.load(LSE + b * slb + qh * slh + token, mask=inside, other=0.0)
        delta = tl.load(DELTA + b * slb + qh * slh + token, mask=inside, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if (m < mid_lo) | (m >= mid_hi):
            start = tl.load(START + b * ssb + token, mask=inside, other=T)
            pt = tl.where(_visible(keys[:, None], start[None, :], token[None, :]), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _packed_attention_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, START, END,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, slb, slh,
    ssb, seb,
    T, kv_heads, qk_scale: tl.constexpr, sm_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads, False)
    keys, k, v = _key_tiles(K, V, b, h, block * BLOCK_N, skb, skh, skt, svb, svh, svt, T, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # The query blocks that can see these keys: from the first key to the end of the last key's document. Those
    # after the last key and inside the first key's document see the whole tile (none, if a document starts in it).
    last_key = tl.minimum(block * BLOCK_N + BLOCK_N, T) - 1
    lo = block * BLOCK_N // BLOCK_M
    hi = tl.cdiv(tl.load(END + b * seb + last_key), BLOCK_M)
    mid_lo, mid_hi = _middle(lo, hi, tl.cdiv(block * BLOCK_N + BLOCK_N - 1, BLOCK_M),
                             tl.load(END + b * seb + block * BLOCK_N) // BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, keys, Q, DO, LSE, DELTA, START, b, h, lo, hi, mid_lo, mid_hi, sqb, sqh, sqt,
                         sdob, sdoh, sdot, slb, slh, ssb, T, qk_scale, PRECISION, GROUP, BLOCK_M, HEAD_DIM)
    tl.store(_tile_at(DK, b, h, keys, sdkb, sdkh, sdkt, HEAD_DIM), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=keys[:, None] < T)
    tl.store(_tile_at(DV, b, h, keys, sdvb, sdvh, sdvt, HEAD_DIM), dv.to(DV.dtype.element_ty),
             mask=keys[:, None] < T)
