"""CCELoss: Apple's Cut-Cross-Entropy (Triton; CUDA only; extra: forgather[gpu]). No z-loss.

CCE never materialises logits: forward computes the logsumexp block by block, backward recomputes the
logits per block and accumulates both gradients, skipping blocks whose softmax is below `filter_eps`
(CCE's "gradient filtering"; "auto" picks a threshold from the dtype, None computes every block).
"""

from __future__ import annotations

import torch

from forgather.loss.base import IGNORE_INDEX, CausalLMLoss, require_extra


class CCELoss(CausalLMLoss):
    name = "cce"
    supports_softcap = True

    def __init__(
        self,
        filter_eps: float | str | None = "auto",
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__(ignore_index=ignore_index, z_loss=z_loss, softcap=softcap)
        require_extra(self.name, "cut-cross-entropy", "cut_cross_entropy")
        self.filter_eps = filter_eps

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(
            hidden, weight, targets, ignore_index=self.ignore_index, softcap=self.softcap,
            reduction="mean", filter_eps=self.filter_eps, impl="cce",
        )

    def extra_repr(self) -> str:
        return f"filter_eps={self.filter_eps!r}, {super().extra_repr()}"
