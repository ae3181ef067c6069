"""ChunkedLoss: fused linear cross-entropy in pure PyTorch, so it runs anywhere (CPU included).

The tokens are processed `chunk_size` at a time: logits of one chunk [C, V] exist at once, and their
gradient is computed right away in the forward pass (softmax minus one-hot), then turned into the gradients
of hidden (written per chunk) and weight (accumulated per chunk, in weight's dtype, as Liger does). Backward
scales both, in place, by the incoming gradient over the number of valid tokens. With `compile=True` the
per-chunk elementwise work (upcast, soft-cap, logsumexp, gradient) is one `torch.compile`d function, so it
reads the chunk's logits twice and writes its gradient once, with no fp32 copy of the chunk in memory;
`inplace=True` writes that gradient over the logits. `FusedLoss` runs the same loop with a Triton kernel per
chunk.

Nothing here makes the host wait for the GPU: the token count stays a device tensor (the chunk work sums,
the backward divides by it), and backward never asks the host whether the incoming gradient is 1 (Liger's
loop does both on the host: two syncs a step). The scaling is one pass over the gradients; on a GPU the
weight's gradient takes 1 / tokens in forward (through each chunk's hidden states) and backward's kernel skips
its pass on the device when the incoming gradient is 1 (`scale_unless_one`).

Peak memory above the inputs: grad hidden + grad weight + C x V x 2 bytes (bf16 logits, gradient in place;
twice that with inplace=False). Larger chunks amortise the read-modify-write of grad weight
(2 x V x H x 2 bytes per chunk).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from forgather.loss.base import IGNORE_INDEX, CausalLMLoss

ChunkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def chunk_loss_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss summed over one chunk's valid tokens, and its gradient w.r.t. the logits in logits' dtype."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = softcap * tanh
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    target_logit = x.gather(1, safe_targets[:, None]).squeeze(1)
    token_loss = lse - target_logit
    if z_loss:
        token_loss = token_loss + z_loss * lse.square()
    weight = valid.to(x.dtype)
    loss = (token_loss * weight).sum()
    # d/dx [lse - x_t + z lse^2] = softmax * (1 + 2 z lse) - onehot(t)
    softmax = torch.exp(x - lse[:, None])
    if z_loss:
        softmax = softmax * (1 + 2 * z_loss * lse)[:, None]
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == safe_targets[:, None]
    grad = (softmax - onehot.to(x.dtype)) * weight[:, None]
    if softcap is not None:
        grad = grad * (1 - tanh.square())
    return loss, grad.to(logits.dtype)


def chunk_loss_and_grad_inplace(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    """`chunk_loss_and_grad` writing the gradient over `logits` (compiled, no second C x V buffer)."""
    loss, grad = chunk_loss_and_grad(logits, targets, ignore_index, z_loss, softcap)
    logits.copy_(grad)
    return loss


def make_chunk_fn(compile: bool, inplace: bool) -> ChunkFn:
    """The per-chunk function `(logits, targets, ignore_index, z_loss, softcap) -> (loss sum, grad_logits)`."""
    if not inplace:
        return torch.compile(chunk_loss_and_grad) if compile else chunk_loss_and_grad
    fn = torch.compile(chunk_loss_and_grad_inplace) if compile else chunk_loss_and_grad_inplace

    def chunk_fn(logits: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(logits, *args), logits

    return chunk_fn


def _scale_fp32(grad: torch.Tensor, factor: torch.Tensor) -> None:
    grad.copy_((grad.float() * factor).to(grad.dtype))


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)  # compiled on first use only: CPU runs never pay for it


def scale_in_place(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor (an fp32 device scalar), multiplied in fp32 and rounded once to grad's dtype.

    `grad.mul_(factor)` on CUDA first rounds the factor to a bf16 gradient's dtype (up to 2^-9 off); the
    compiled form reads grad once and writes it once, with no fp32 copy in memory. CPU kernels multiply in
    fp32 already.
    """
    if grad.device.type == "cpu" or grad.dtype == torch.float32:
        grad.mul_(factor)
        return
    _compiled(_scale_fp32)(grad, factor)


SCALE_BLOCK, SCALE_WARPS, SCALE_PROGRAMS_PER_SM = 4096, 8, 4


def scale_unless_one(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """`scale_in_place(grad, factor)`, except that on a GPU a factor of exactly 1 costs no pass over grad.

    The Triton kernel (scale_kernels.py) reads the factor on the device and returns when it is 1, so the host
    never waits to ask. Elsewhere (CPU, no Triton, a non-contiguous grad) it is scale_in_place: the same numbers.
    """
    from forgather.triton_support import interpreting, triton_runs

    if not grad.is_contiguous() or not (triton_runs(grad.device) or interpreting()):
        scale_in_place(grad, factor)
        return
    from forgather.loss import scale_kernels

    n = grad.numel()
    sms = torch.cuda.get_device_properties(grad.device).multi_processor_count if grad.is_cuda else 2
    programs = max(1, min(-(-n // SCALE_BLOCK), sms * SCALE_PROGRAMS_PER_SM))
    scale_kernels._scale_unless_one[(programs,)](grad, factor.float().reshape(1), n, BLOCK=SCALE_BLOCK,
                                                 num_warps=SCALE_WARPS)


def _prescale_fp32(h: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (h.float() * factor).to(h.dtype)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place; out may have a wider dtype than a and b (autocast)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in acc's dtype; for an fp32 acc of bf16 products, without a bf16 [V, H] temporary on GPUs."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss in forward, with both gradients computed there too; backward scales them by grad_output / tokens.

    `chunk_fn(logits [C, V], targets [C], ignore_index, z_loss, softcap) -> (loss sum, grad_logits)` does
    the work of one chunk (it may write the gradient over the logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, z_loss, softcap, chunk_fn, needs_grad):
        n_valid = (targets != ignore_index).sum().clamp(min=1).float()
        # Gradients come back in the inputs' dtypes; the matmuls run in the autocast dtype when autocast is on
        # (bf16-mixed: fp32 weights, bf16 logits), else in the inputs' dtype.
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
        # Where grad weight has the products' dtype, the first chunk's product is written into it, not added to
        # zeros: one write and one read of a [V, H] tensor fewer (~0.2 ms a step at vocab 128k, hidden 2048, bf16).
        first_writes = weight.dtype == dtype and hidden.shape[0] > 0
        grad_weight = (torch.empty_like if first_writes else torch.zeros_like)(weight) if needs_grad[1] else None
        # On a GPU the weight's gradient takes 1 / tokens here, through each chunk's hidden states (C x H, rounded
        # once to their dtype): backward then scales it only by grad_output, which scale_unless_one skips on the
        # device when it is 1, sparing a pass over the [V, H] gradient. The CPU keeps the one scaling in backward.
        from forgather.triton_support import triton_runs

        prescale = grad_weight is not None and triton_runs(hidden.device)
        inv_tokens = n_valid.reciprocal() if prescale else None
        loss = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                logits = h @ w.t()
                chunk_loss, grad_logits = chunk_fn(logits, targets[start : start + chunk_size], ignore_index, z_loss, softcap)
                del logits
                loss += chunk_loss
                if grad_hidden is not None:
                    _matmul_into(grad_hidden[start : start + chunk_size], grad_logits, w)
                if grad_weight is not None:
                    write = _matmul_into if first_writes and start == 0 else _accumulate_matmul
                    write(grad_weight, grad_logits.t(), _compiled(_prescale_fp32)(h, inv_tokens) if prescale else h)
                del grad_logits  # before the next chunk's logits are allocated
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.backward_done, ctx.prescaled = False, prescale
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_done:
            # The gradients are scaled in place (a copy would add a weight-sized buffer to the peak).
            raise RuntimeError("a chunked/fused linear cross-entropy supports one backward pass per forward")
        ctx.backward_done = True
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        factor = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32)) / n_valid
        if grad_hidden is not None:
            scale_in_place(grad_hidden, factor)
        if grad_weight is not None:
            if ctx.prescaled:
                scale_unless_one(grad_weight, grad_output)
            else:
                scale_in_place(grad_weight, factor)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_token_loss(
    loss: CausalLMLoss, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_fn: ChunkFn
) -> torch.Tensor:
    """`loss.token_loss` through ChunkedLinearCrossEntropy, with `loss`'s chunk size and options; gradients
    only for the inputs that need them."""
    grad_on = torch.is_grad_enabled()
    needs_grad = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(
        hidden, weight, targets, loss.chunk_size, loss.ignore_index, loss.z_loss, loss.softcap, chunk_fn, needs_grad
    )


class ChunkedLoss(CausalLMLoss):
    """Chunked fused linear cross-entropy, pure PyTorch; `compile=True` fuses each chunk's elementwise work."""

    name = "chunked"
    supports_z_loss = True
    supports_softcap = True

    def __init__(
        self,
        chunk_size: int = 1024,
        compile: bool = True,
        inplace: bool = True,
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
        self.check_chunk_size(chunk_size)
        for option, value in (("compile", compile), ("inplace", inplace)):
            if not isinstance(value, bool):
                raise ValueError(f"ChunkedLoss({option}={value!r}): {option} takes true or false")
        self.chunk_size = chunk_size
        self.compile = compile
        self.inplace = inplace
        self._chunk_fn = make_chunk_fn(compile, inplace)

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_token_loss(self, hidden, weight, targets, self._chunk_fn)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, compile={self.compile}, inplace={self.inplace}, {super().extra_repr()}"
