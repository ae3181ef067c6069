"""FusedLoss: the default fused linear cross-entropy on GPU.

ChunkedLoss's loop (forgather.loss.chunked: logits of `chunk_size` tokens at a time, both gradients computed
in forward, nothing that makes the host wait for the GPU) with Liger-Kernel's Triton cross-entropy kernel
doing each chunk's work: one pass over the logits for the log-sum-exp (online softmax), one that writes the
gradient over them. We call Liger's kernel rather than Liger's loss function because that function reads the
valid-token count and the incoming gradient on the host (two syncs a step, which stall a training loop that
queues work ahead); the kernel's `reduction="sum"` path needs neither, and the loop divides by the count on
the device.

The chunk is a number of tokens, not Liger's multiple of the hidden size: every chunk re-reads the weight
twice and read-modify-writes grad weight (4 x V x H x 2 bytes), so the cost of chunking depends on the
tokens per chunk alone (Liger's rule gives 256-token chunks at hidden 2048 / vocab 128k). 2048 tokens: in
training the 1.24B shape (8,192 tokens a step, vocab 128k) ran 1.0095x faster than with 1024 (H100, the same
call), 4096 only 1.003x more. The chunk's bf16 logits (C x V x 2 bytes: 500 MiB at vocab 128k, 125 MiB at
32k) are the peak above the gradients; `chunk_size=1024` halves it. Timings: docs/benchmarks.md, "Fused
linear cross-entropy" and "The loss's chunks".
"""

from __future__ import annotations

import torch

from forgather.loss.base import IGNORE_INDEX, CausalLMLoss, require_extra
from forgather.loss.chunked import chunked_token_loss

DEFAULT_CHUNK_SIZE = 2048
# Liger's cross-entropy launch settings (its own loss function uses the same).
_MAX_BLOCK = 32768
_NUM_WARPS = 32


def liger_chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss summed over one chunk's valid tokens; the gradient is written over `logits` (and returned)."""
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    rows, vocab = logits.shape
    token_loss = torch.zeros(rows, dtype=torch.float32, device=logits.device)  # ignored rows stay 0
    liger_cross_entropy_kernel[(rows,)](
        X_ptr=logits, X_stride=logits.stride(0), Y_ptr=targets, Y_stride=targets.stride(0), weight_ptr=None,
        loss_ptr=token_loss, z_loss_ptr=None, loss_stride=token_loss.stride(0),
        token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0,
        n_cols=vocab, n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=ignore_index,
        lse_square_scale=z_loss, label_smoothing=0.0, reduction="sum", softcap=softcap,
        RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
        BLOCK_SIZE=min(_MAX_BLOCK, triton.next_power_of_2(vocab)), HAS_WEIGHT=False,
        HAS_SOFTCAPPING=softcap is not None, HAS_GRADIENTS=True, num_warps=_NUM_WARPS,
    )
    return token_loss.sum(), logits


class FusedLoss(CausalLMLoss):
    """Chunked fused linear cross-entropy with Liger's Triton kernel per chunk; CUDA only (forgather[gpu])."""

    name = "fused"
    supports_z_loss = True
    supports_softcap = True

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
        self.check_chunk_size(chunk_size)
        require_extra(self.name, "liger-kernel", "liger_kernel.ops.cross_entropy")
        self.chunk_size = chunk_size

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cuda":
            raise RuntimeError(f"loss 'fused' runs on CUDA devices (a Triton kernel); got {hidden.device}. "
                               "On the CPU use loss=chunked")
        return chunked_token_loss(self, hidden, weight, targets.contiguous(), liger_chunk_loss_and_grad)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, {super().extra_repr()}"
