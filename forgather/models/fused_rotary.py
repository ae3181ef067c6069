"""Rotary embedding of the fused q/k/v product as Triton custom ops on GPUs.

Why kernels of our own: with q/k/v as one product (`fused_projections`, "qkv" on GPUs), backward must hand
that product one gradient [B, T, (H + 2 KV) x D]: the rotated queries' and keys' gradients turned back, and the
values', side by side. Inductor writes it as one pointwise kernel over the whole width that evaluates every
piece at every element under masks (13 loads an element, indexing by `% 3072`): 62 us a layer on an H100 for
~100 MB, ~48% of the HBM's rate (2026-12-06, the 1.24B bench's profile), while the forward's rotation took
20 us. Here one program takes a block of tokens of one head, loads the head's two halves as tiles, and writes
the gradient's rows in place: each element is read once and written once. Measured (H100, 1.24B step): 0.62 +
0.59 ms a step for the two kernels against inductor's 0.33 + 1.00 and packed attention's copy of v; the step
1.001-1.003x, within a call's spread, since the step runs at the GPU's power limit (docs/benchmarks.md).

Semantics, `rope.apply_rotary`'s on the split product: out = x * cos + rotate_half(x) * sin, with cos and sin
rounded to x's dtype first, computed in fp32 and rounded once (as inductor's compiled kernel does; eager torch
rounds each product, so the two agree within a rounding). The backward turns the gradient g back:
dx = g * cos + rotate_half^T(g * sin), i.e. (g1 c1 + g2 s2, g2 c2 - g1 s1) for the halves.

`rotary_qkv(qkv [B, T, (H + 2 KV) x D], cos, sin [B, T, D], heads, kv_heads)` -> q [B, H, T, D], k, v
[B, KV, T, D], each stored [B, T, heads, D] (dense: v is a copy, which packed attention would otherwise make
itself; a view with gaps is what `packed_attention._dense` refuses to pass on). `attention.Attention` reaches
it through `triton_ops("fused_rotary")` (triton_ops.py), which imports this module by name where Triton is installed
(exported standalone code and CPU builds run `apply_rotary`). `reference_rotary_qkv` and
`reference_rotary_qkv_backward` are the kernels' computations in plain torch (the tests' ground truth: the
second is autograd's gradient of the first).
"""

from __future__ import annotations

import torch

from .rope import apply_rotary

# (tokens a program, warps): a program rotates BLOCK_T tokens of one head
ROTARY_TILING = (64, 4)


def reference_rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's semantics in torch: apply_rotary on the split product, in fp32, rounded once."""
    q, k, v = _split(qkv, heads, kv_heads)
    q, k = (apply_rotary(t.float(), cos.to(qkv.dtype).float(), sin.to(qkv.dtype).float(), heads_dim=2).to(qkv.dtype)
            for t in (q, k))
    return q.transpose(1, 2), k.transpose(1, 2), v.contiguous().transpose(1, 2)


def reference_rotary_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor) -> torch.Tensor:
    """The backward kernel's formula in torch: the gradients of q, k [B, heads, T, D] turned back through the
    rotation, in fp32 and rounded once, beside v's, as the product's gradient [B, T, (H + 2 KV) x D]."""
    c1, c2 = cos.to(dq.dtype).float().unsqueeze(1).chunk(2, dim=-1)
    s1, s2 = sin.to(dq.dtype).float().unsqueeze(1).chunk(2, dim=-1)

    def back(g: torch.Tensor) -> torch.Tensor:
        g1, g2 = g.float().chunk(2, dim=-1)
        return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1).to(g.dtype)

    return torch.cat([t.transpose(1, 2).flatten(2) for t in (back(dq), back(dk), dv)], dim=-1)


def _split(qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """qkv [B, T, (H + 2 KV) x D] -> views q [B, T, H, D], k, v [B, T, KV, D]."""
    dim = _head_dim(qkv, heads, kv_heads)
    return tuple(t.unflatten(-1, (-1, dim)) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))


def _head_dim(qkv: torch.Tensor, heads: int, kv_heads: int) -> int:
    dim, extra = divmod(qkv.shape[-1], heads + 2 * kv_heads)
    if qkv.dim() != 3 or extra or dim % 2:
        raise ValueError(f"rotary_qkv takes the fused product [B, T, (heads + 2 kv_heads) x head_dim] with an even "
                         f"head_dim; got {tuple(qkv.shape)} for {heads} heads and {kv_heads} kv heads")
    return dim


def _tables(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """cos or sin as [B, T, D] with D contiguous (the kernels take a stride per batch row and per token)."""
    t = t.expand(like.shape[0], like.shape[1], t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _constants(dim: int) -> dict[str, int]:
    half = dim // 2
    return dict(HALF=half, BLOCK_HALF=1 << (half - 1).bit_length(), BLOCK_T=ROTARY_TILING[0],
                num_warps=ROTARY_TILING[1])


def _grid(batch: int, length: int, heads: int) -> tuple[int, int, int]:
    return heads, -(-length // ROTARY_TILING[0]), batch


@torch.library.triton_op("forgather::rotary_qkv", mutates_args=())
def _forward_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import fused_rotary_kernels as kernels

    dim = _head_dim(qkv, heads, kv_heads)
    batch, length, _ = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = _tables(cos, qkv), _tables(sin, qkv)
    q = torch.empty((batch, length, heads, dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((batch, length, kv_heads, dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    wrap_triton(kernels._rotary_qkv_forward)[_grid(batch, length, heads + 2 * kv_heads)](
        qkv, cos, sin, q, k, v, qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), sin.stride(0),
        sin.stride(1), q.stride(0), q.stride(1), k.stride(0), k.stride(1), length, heads, kv_heads,
        **_constants(dim))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@torch.library.triton_op("forgather::rotary_qkv_backward", mutates_args=())
def _backward_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> torch.Tensor:
    from torch.library import wrap_triton

    from . import fused_rotary_kernels as kernels

    batch, heads, length, dim = dq.shape
    kv_heads = dk.shape[1]
    dq, dk, dv = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv))
    dqkv = torch.empty((batch, length, (heads + 2 * kv_heads) * dim), dtype=dq.dtype, device=dq.device)
    cos, sin = _tables(cos, dqkv), _tables(sin, dqkv)
    wrap_triton(kernels._rotary_qkv_backward)[_grid(batch, length, heads + 2 * kv_heads)](
        dq, dk, dv, cos, sin, dqkv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], cos.stride(0),
        cos.stride(1), sin.stride(0), sin.stride(1), dqkv.stride(0), dqkv.stride(1), length, heads, kv_heads,
        **_constants(dim))
    return dqkv


def _setup_context(ctx, inputs, output) -> None:
    _qkv, cos, sin, _heads, _kv_heads = inputs
    ctx.save_for_backward(cos, sin)
    ctx.pieces = [(t.shape, t.dtype, t.device) for t in output]


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    # a piece that took no part in the loss passes zeros (the kernel reads all three)
    dq, dk, dv = (torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                  for g, (shape, dtype, device) in zip((dq, dk, dv), ctx.pieces))
    return _backward_op(dq, dk, dv, cos, sin), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k rotated and v of the fused product, each [B, heads, T, D] stored [B, T, heads, D] (module docstring);
    one kernel forward and one backward."""
    return _forward_op(qkv, cos, sin, heads, kv_heads)
