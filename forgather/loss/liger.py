"""LigerLoss: Liger-Kernel's fused linear cross-entropy (Triton; CUDA only; extra: forgather[gpu]).

Liger computes the gradients chunk by chunk in forward, as ChunkedLoss does, with a Triton kernel for the
softmax gradient written in place over the chunk's logits. `chunk_mem_const` is Liger's own knob: the chunk
holds about chunk_mem_const x H x 2 bytes per token of logits; 1 (Liger's default) gives 512-token chunks at
hidden 4096 / vocab 128k, and larger values trade memory for fewer, faster grad-weight updates.
"""

from __future__ import annotations

import torch

from forgather.loss.base import IGNORE_INDEX, CausalLMLoss, require_extra


class LigerLoss(CausalLMLoss):
    name = "liger"
    supports_z_loss = True
    supports_softcap = True

    def __init__(
        self,
        chunk_mem_const: int = 1,
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
        if isinstance(chunk_mem_const, bool) or not isinstance(chunk_mem_const, int) or chunk_mem_const < 1:
            raise ValueError(f"LigerLoss(chunk_mem_const={chunk_mem_const!r}): chunk_mem_const takes an integer >= 1, "
                             "e.g. 1 (Liger's default)")
        require_extra(self.name, "liger-kernel", "liger_kernel.transformers.functional")
        self.chunk_mem_const = chunk_mem_const

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index=self.ignore_index, lse_square_scale=self.z_loss,
            softcap=self.softcap, reduction="mean", chunk_mem_const=self.chunk_mem_const,
        )

    def extra_repr(self) -> str:
        return f"chunk_mem_const={self.chunk_mem_const}, {super().extra_repr()}"
