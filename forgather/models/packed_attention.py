"""Packed-document attention on GPUs: our Triton kernels for rows that pack many short documents.

Why a kernel of our own: the training bench's rows (~19 documents of median ~52 tokens in a row of 2,048) hold
many short documents, though most tokens sit in the few long ones: over the corpus a query sees ~250 keys, a
quarter of a causal row's 1,024. Flex attention took 0.70 ms a layer on them (forward + backward, H200, its best
tiling) and flash attention 2's variable-length kernels 0.9, against 0.78 for SDPA's causal kernel over all
1,024: both spend the time on per-block overheads (block-mask bookkeeping and a mask function evaluated per
element; one padded tile grid per document). Documents are contiguous runs, so a block of queries needs only the
keys from its first query's document start to its last query, and the mask is one comparison against each
query's document start; the kv heads' query groups are stacked into one program, so a key tile is loaded once
a group and the keys' gradients need no atomics (packed_attention_kernels.py).

Semantics, the same as flex attention's document mask (`AttentionMask`): query t sees key j when
`start[t] <= j <= t`, where start[t] is the first position of t's document; document ids must be
nondecreasing along a row (packing's are: `document_ids_from_positions`), each run of one id a document.

`packed_attention(q [B, H, T, D], k, v [B, KV, T, D], start [B, T], end [B, T], tiling) -> [B, H, T, D]` is a
Triton custom op (`forgather::packed_attention`, its backward `forgather::packed_attention_backward`, both
`torch.library.triton_op`): torch.compile sees the kernels themselves and launches them from its own generated
code, which costs the host far less per launch than a Python op (the first, opaque version left the GPU idle
2.3 ms more a 1.24B step). `attention_fn="packed"` reaches it through `attention.packed_attention`, which imports
this module by name when the layer is built, so standalone exported code (which cannot import forgather) falls
back to SDPA with the same mask. `attention.document_bounds` turns document ids into (start, end);
`reference_packed_attention` is the same computation in plain torch (the CPU tests' ground truth); `tiling`
turns `attention_kernel_options` into the kernels' tiles.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

from .attention import check_packed

# Each kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts the query positions of one head (a
# program holds GROUP x BLOCK_M rows), BLOCK_N the keys of a tile.
KERNELS = ("forward", "dq", "dkdv")
# Measured fastest on the training bench's rows (H200, bf16, 32 / 8 heads of 64; scripts/bench_step_pieces.py
# --duel --packed-sweep, 2026-12-04): the key/value gradients' tiles decide (1.35x over 32 x 32 with 8 warps).
TILING: dict[str, tuple[int, int, int, int]] = {
    "forward": (16, 64, 4, 3),
    "dq": (16, 32, 4, 3),
    "dkdv": (16, 64, 4, 3),
}


def tiling(options: Mapping[str, Any] | None = None) -> list[int]:
    """`attention_kernel_options` of attention_fn='packed' -> the op's flat tiling argument (12 ints). Options map
    a kernel ("forward", "dq", "dkdv") to [BLOCK_M, BLOCK_N, num_warps, num_stages]; the rest keep TILING's."""
    chosen = dict(TILING)
    for key, value in (options or {}).items():
        if key not in KERNELS:
            raise ValueError(f"kernel_options: {key!r} is not a kernel of attention_fn='packed'; its options map "
                             f"{' / '.join(KERNELS)} to [BLOCK_M, BLOCK_N, num_warps, num_stages]")
        value = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)) else value
        if (not isinstance(value, list) or len(value) != 4 or not all(type(n) is int and n > 0 for n in value)
                or any(n & (n - 1) for n in value[:3]) or value[1] < 16):
            raise ValueError(f"kernel_options: {key} takes [BLOCK_M, BLOCK_N, num_warps, num_stages], positive "
                             f"integers, the first three powers of two, BLOCK_N at least 16; got {value!r}")
        chosen[key] = tuple(value)
    return [n for key in KERNELS for n in chosen[key]]


def reference_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor
                               ) -> torch.Tensor:
    """The kernels' semantics in plain torch: softmax over keys start[t] <= j <= t, fp32 scores."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    length = q.shape[2]
    keys = torch.arange(length, device=q.device)
    visible = (keys[None, None, :] >= start[:, :, None]) & (keys[None, None, :] <= keys[None, :, None])
    scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _like_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor like t [B, H, T, D], stored as [B, T, H, D] (the layout a layer's heads come from and
    return to: its transpose back to [B, T, H * D] is then free)."""
    b, h, length, d = t.shape
    return torch.empty((b, length, h, d), dtype=t.dtype, device=t.device).transpose(1, 2)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, T, D] itself where its storage is dense (stored [B, H, T, D], or [B, T, H, D] as a layer's heads
    are), else a copy stored [B, T, H, D]. Compiled, the op failed on views with gaps (v split from the fused key
    and value products, `fused_projections=kv`): an illegal memory access in the 1.24B bench's backward, an
    autograd error in scripts/check_packed_layouts.py (H100, 2026-12-05); eager it was right, and so are the
    fused norm ops, compiled, on such views. Why it failed is not known; dense inputs make it right."""
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError(f"packed attention needs the head dimension contiguous; got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, tiles: list[int]) -> int:
    groups, extra = divmod(q.shape[1], k.shape[1])
    if extra or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"packed attention takes q [B, H, T, D] and k, v [B, KV, T, D] of one length, KV dividing "
                         f"H; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_packed(q.shape[1], k.shape[1], q.shape[-1])  # the layer's own check, for callers of the op itself
    if start.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"document start {tuple(start.shape)} does not match [B, T] of q {tuple(q.shape)}")
    for name, block_m in zip(KERNELS, tiles[::4]):
        if groups * block_m < 16:
            raise ValueError(f"packed attention's {name} kernel holds {groups} heads x BLOCK_M={block_m} query rows; "
                             f"the products need at least 16: raise its BLOCK_M")
    return groups


def launch_constants(tiles: Iterable[int], head_dim: int, dtype: torch.dtype, **constants) -> dict[str, Any]:
    """A kernel's compile-time constants and launch options: the tiles, the scales, the products' precision
    (also what scripts/packed_kernel_registers.py compiles with)."""
    block_m, block_n, warps, stages = tiles
    scale = 1.0 / math.sqrt(head_dim)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, HEAD_DIM=head_dim,
                qk_scale=scale * math.log2(math.e), PRECISION="ieee" if dtype == torch.float32 else "tf32",
                **constants)


def _launch(kernel, grid, tiles: list[int], q: torch.Tensor, **constants):
    """The kernel wrapped for torch.compile, and its `launch_constants`."""
    from torch.library import wrap_triton

    return wrap_triton(kernel)[grid], launch_constants(tiles, q.shape[-1], q.dtype, **constants)


@torch.library.triton_op("forgather::packed_attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                tiles: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from . import packed_attention_kernels as kernels

    groups = _check(q, k, v, start, tiles)
    batch, heads, length, _ = q.shape
    out = _like_layout(q)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    launch, constants = _launch(kernels._packed_attention_forward, (_cdiv(length, tiles[0]), batch * k.shape[1]),
                                tiles[0:4], q, GROUP=groups)
    launch(q, k, v, out, lse, start, *_strides(q), *_strides(k), *_strides(v), *_strides(out), lse.stride(0),
           lse.stride(1), start.stride(0), length, k.shape[1], **constants)
    return out, lse


@torch.library.triton_op("forgather::packed_attention_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, start: torch.Tensor, end: torch.Tensor, tiles: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import packed_attention_kernels as kernels

    groups = _check(q, k, v, start, tiles)
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    dq, dk, dv = _like_layout(q), _like_layout(k), _like_layout(v)
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(dim)
    launch, constants = _launch(kernels._packed_attention_dq, (_cdiv(length, tiles[4]), batch * kv_heads),
                                tiles[4:8], q, GROUP=groups, sm_scale=sm_scale)
    launch(q, k, v, out, grad, dq, lse, delta, start, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
           *_strides(grad), *_strides(dq), lse.stride(0), lse.stride(1), start.stride(0), length, kv_heads,
           **constants)
    launch, constants = _launch(kernels._packed_attention_dkdv, (_cdiv(length, tiles[9]), batch * kv_heads),
                                tiles[8:12], q, GROUP=groups, sm_scale=sm_scale)
    launch(q, k, v, grad, dk, dv, lse, delta, start, end, *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
           *_strides(dk), *_strides(dv), lse.stride(0), lse.stride(1), start.stride(0), end.stride(0), length,
           kv_heads, **constants)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, start, end, tiles = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, start, end)
    ctx.tiles = tiles


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, start, end = ctx.saved_tensors
    dq, dk, dv = _backward_op(_dense(grad), q, k, v, out, lse, start, end, ctx.tiles)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                     tiles: list[int] | None = None) -> torch.Tensor:
    """Attention of packed documents (see the module docstring): q [B, H, T, D], k, v [B, KV, T, D], start and
    end int32 [B, T] from `attention.document_bounds`, `tiles` from `tiling` (None: TILING) -> [B, H, T, D],
    stored as [B, T, H, D]."""
    q, k, v = _dense(q), _dense(k), _dense(v)
    start, end = start.contiguous(), end.contiguous()
    return _forward_op(q, k, v, start, end, tiling() if tiles is None else tiles)[0]
