"""Triton kernels of packed-document attention (packed_attention.py holds the ops, the layout and the semantics).

A query at position t of a row sees the keys from the start of its document up to itself: `start[t] <= j <= t`.
Documents are contiguous runs, so each block of queries needs only the keys from its first query's document
start to its last query, and each block of keys only the queries from its first key to the end of its last
key's document. The grouped-query heads that share a key/value head are stacked into one program's rows
(GROUP x BLOCK_M rows): each key and value tile is loaded once for the whole group, and the key/value gradients
of a group are summed inside one program, with no atomics.

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
def _program(kv_heads):
    """This program's block along the row, its batch row and its kv head."""
    return tl.program_id(0), tl.program_id(1) // kv_heads, tl.program_id(1) % kv_heads


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
def _key_range(START, ssb, b, block, token, inside, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each of a query block's rows' document start, and the keys the block visits: from its first query's
    document start (down to a tile boundary) to its last query."""
    start = tl.load(START + b * ssb + token, mask=inside, other=0)
    first = tl.load(START + b * ssb + block * BLOCK_M) // BLOCK_N * BLOCK_N
    return start, first, tl.minimum(block * BLOCK_M + BLOCK_M, T)


@triton.jit
def _packed_attention_forward(
    Q, K, V, O, LSE, START,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, ssb,
    T, kv_heads, qk_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads)
    head, token, inside = _group_rows(block, GROUP, BLOCK_M, T)
    qh = h * GROUP + head
    q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
    start, first, last = _key_range(START, ssb, b, block, token, inside, T, BLOCK_M, BLOCK_N)
    m_i = tl.full([GROUP * BLOCK_M], _HIDDEN, tl.float32)
    l_i = tl.zeros([GROUP * BLOCK_M], tl.float32)
    acc = tl.zeros([GROUP * BLOCK_M, HEAD_DIM], tl.float32)
    for n in range(first, last, BLOCK_N):
        keys = n + tl.arange(0, BLOCK_N)
        k = tl.load(_tile_at(K, b, h, keys, skb, skh, skt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
        v = tl.load(_tile_at(V, b, h, keys, svb, svh, svt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
        visible = (keys[None, :] >= start[:, None]) & (keys[None, :] <= token[:, None])
        s = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, _HIDDEN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    tl.store(_rows_at(O, b, qh, token, sob, soh, sot, HEAD_DIM), (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=inside[:, None])
    tl.store(LSE + b * slb + qh * slh + token, m_i + tl.math.log2(l_i), mask=inside)


@triton.jit
def _packed_attention_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA, START,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt, slb, slh, ssb,
    T, kv_heads, qk_scale: tl.constexpr, sm_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads)
    head, token, inside = _group_rows(block, GROUP, BLOCK_M, T)
    qh = h * GROUP + head
    q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
    do = tl.load(_rows_at(DO, b, qh, token, sdob, sdoh, sdot, HEAD_DIM), mask=inside[:, None], other=0.0)
    o = tl.load(_rows_at(O, b, qh, token, sob, soh, sot, HEAD_DIM), mask=inside[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * slb + qh * slh + token, delta, mask=inside)
    lse = tl.load(LSE + b * slb + qh * slh + token, mask=inside, other=0.0)
    start, first, last = _key_range(START, ssb, b, block, token, inside, T, BLOCK_M, BLOCK_N)
    dq = tl.zeros([GROUP * BLOCK_M, HEAD_DIM], tl.float32)
    for n in range(first, last, BLOCK_N):
        keys = n + tl.arange(0, BLOCK_N)
        k = tl.load(_tile_at(K, b, h, keys, skb, skh, skt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
        v = tl.load(_tile_at(V, b, h, keys, svb, svh, svt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
        visible = (keys[None, :] >= start[:, None]) & (keys[None, :] <= token[:, None])
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible, tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(_rows_at(DQ, b, qh, token, sdqb, sdqh, sdqt, HEAD_DIM), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=inside[:, None])


@triton.jit
def _packed_attention_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, START, END,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, slb, slh,
    ssb, seb,
    T, kv_heads, qk_scale: tl.constexpr, sm_scale: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    block, b, h = _program(kv_heads)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.load(_tile_at(K, b, h, keys, skb, skh, skt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
    v = tl.load(_tile_at(V, b, h, keys, svb, svh, svt, HEAD_DIM), mask=keys[:, None] < T, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # the queries that can see these keys: from the first key to the end of the last key's document
    end = tl.load(END + b * seb + tl.minimum(block * BLOCK_N + BLOCK_N, T) - 1)
    for m in range(block * BLOCK_N // BLOCK_M, tl.cdiv(end, BLOCK_M)):
        head, token, inside = _group_rows(m, GROUP, BLOCK_M, T)
        qh = h * GROUP + head
        q = tl.load(_rows_at(Q, b, qh, token, sqb, sqh, sqt, HEAD_DIM), mask=inside[:, None], other=0.0)
        do = tl.load(_rows_at(DO, b, qh, token, sdob, sdoh, sdot, HEAD_DIM), mask=inside[:, None], other=0.0)
        lse = tl.load(LSE + b * slb + qh * slh + token, mask=inside, other=0.0)
        delta = tl.load(DELTA + b * slb + qh * slh + token, mask=inside, other=0.0)
        start = tl.load(START + b * ssb + token, mask=inside, other=T)
        visible = (keys[:, None] >= start[None, :]) & (keys[:, None] <= token[None, :])  # [BLOCK_N, rows]
        scores = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.where(visible, tl.math.exp2(scores - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(_tile_at(DK, b, h, keys, sdkb, sdkh, sdkt, HEAD_DIM), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=keys[:, None] < T)
    tl.store(_tile_at(DV, b, h, keys, sdvb, sdvh, sdvt, HEAD_DIM), dv.to(DV.dtype.element_ty),
             mask=keys[:, None] < T)
