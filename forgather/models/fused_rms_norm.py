"""RMSNorm and the residual add before it as Triton custom ops on GPUs (`fused_norm=true`).

Why kernels of our own: in a compiled 1.24B training step (H200, docs/benchmarks.md) inductor turns each
RMSNorm's backward into two kernels plus an aten sum for the weight's gradient: ~2.7 ms a step for the 32 norms,
where reading the norm's input, its output's gradient and the residual stream's gradient once and writing the
input's gradient once would take ~1 ms at the HBM's rate. The pre-LN layer adds the attention's output to the
residual stream and normalizes the sum; `add_rms_norm` does both in one pass and its backward adds the two
gradients that reach the sum (from the stream above and through the norm) in the same pass. Liger ships kernels
for the same computation, but behind an autograd.Function that launches them from Python; these are
`torch.library.triton_op`s (`forgather::rms_norm`, `forgather::rms_norm_backward`), which torch.compile places
inside the layer's graph and launches from its own code, as packed_attention.py's are.

Semantics, those of `norm.add_rms_norm` (`norm.rms_norm` on `x + delta`): the sum rounded to x's dtype, the
statistics in fp32, the normed values rounded to x's dtype before the weight, the output in the promoted dtype of
weight and input.
The backward rounds `dy * weight` to x's dtype as autograd does; the weight's gradient sums fp32 products where
autograd rounds each product first (within rounding of the reference, checked by tests/gpu and
scripts/interpret_fused_rms_norm.py).

`rms_norm(x, weight, eps)` -> y and `add_rms_norm(x, delta, weight, eps)` -> (x + delta, y) take [..., hidden]
tensors with the hidden dimension contiguous; `norm.RMSNorm(fused=True)` reaches them through
`triton_ops("fused_rms_norm")` (triton_ops.py), which imports this module by name (exported standalone code runs
the torch expression). `NORM_TILING` sets the kernels' launch shape (`launch_constants`).
"""

from __future__ import annotations

import torch

# (rows a program, warps) of the forward; (rows an iteration, warps, programs an SM) of the backward
NORM_TILING: dict[str, tuple[int, ...]] = {"forward": (1, 8), "backward": (2, 8, 2)}


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with the last dim contiguous, a view where the layout allows (the kernels take one
    stride per row; fused_swiglu.py's too)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def launch_constants(kernel: str, n_cols: int, **constants) -> dict:
    """The forward's or backward's compile-time constants and launch options at NORM_TILING for rows of n_cols
    (also what scripts/packed_kernel_registers.py --norm compiles with). NORM_TILING's warps are for rows of up
    to 2,048; wider rows get proportionally more (up to 16), so a thread holds as many elements of each row
    (the backward at 4,096 would otherwise take 135 registers a thread and leave one program an SM)."""
    rows, warps = NORM_TILING[kernel][:2]
    block = 1 << max(n_cols - 1, 1).bit_length()
    return dict(ROWS=rows, BLOCK=block, num_warps=min(16, warps * max(1, block // 2048)), **constants)


def _programs(t: torch.Tensor, n_rows: int) -> int:
    """Programs of the backward: a few an SM on a GPU (each sums its rows' weight gradient in registers)."""
    per_sm = NORM_TILING["backward"][2]
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count if t.device.type == "cuda" else 4
    return max(1, min(n_rows, sms * per_sm))


@torch.library.triton_op("forgather::rms_norm", mutates_args=())
def _forward_op(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import fused_rms_norm_kernels as kernels

    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if delta is not None else x.new_empty(0)
    d2 = as_rows(delta) if delta is not None else x2
    s2 = s.view(-1, n_cols) if delta is not None else x2
    y2 = y.view(-1, n_cols)
    launch = launch_constants("forward", n_cols, eps=eps, HAS_DELTA=delta is not None)
    wrap_triton(kernels._rms_norm_forward)[(-(-n_rows // launch["ROWS"]),)](
        x2, d2, weight, y2, s2, rstd, x2.stride(0), d2.stride(0), y2.stride(0), s2.stride(0), n_rows, n_cols,
        **launch)
    return y, s, rstd


@torch.library.triton_op("forgather::rms_norm_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.library import wrap_triton

    from . import fused_rms_norm_kernels as kernels

    s2, dy2 = as_rows(s), as_rows(dy)
    n_rows, n_cols = s2.shape
    ds2 = as_rows(ds) if ds is not None else dy2
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    dx2 = dx.view(-1, n_cols)
    programs = _programs(s, n_rows)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=s.device)
    wrap_triton(kernels._rms_norm_backward)[(programs,)](
        dy2, ds2, s2, weight, rstd, dx2, partial, dy2.stride(0), ds2.stride(0), s2.stride(0), dx2.stride(0),
        n_rows, n_cols, -(-n_rows // programs), **launch_constants("backward", n_cols, HAS_DS=ds is not None))
    return dx, partial.sum(0).to(weight.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, delta, weight, _eps = inputs
    _y, s, rstd = output
    ctx.save_for_backward(s if delta is not None else x, weight, rstd)
    ctx.has_delta = delta is not None


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if not ctx.has_delta:
        ds = None
    if dy is None:  # the norm's output took no part in the loss: only the residual stream's gradient passes
        dy = torch.zeros(s.shape, dtype=torch.promote_types(weight.dtype, s.dtype), device=s.device)
    dx, dweight = _backward_op(dy, ds, s, weight, rstd)
    return dx, (dx if ctx.has_delta else None), dweight, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`norm.rms_norm(x, weight, eps)` in one kernel forward and one backward."""
    return _forward_op(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, `norm.rms_norm(s, weight, eps)`) for s = x + delta, in one kernel forward and one backward."""
    y, s, _ = _forward_op(x, delta, weight, eps)
    return s, y
