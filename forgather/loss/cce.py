"""CCELoss: Apple's Cut-Cross-Entropy (Triton; CUDA only; extra: forgather[gpu]). No z-loss.

CCE never materialises logits: forward computes the logsumexp block by block, backward recomputes the
logits per block and accumulates both gradients, skipping blocks whose softmax is below `filter_eps`
(CCE's "gradient filtering"; "auto" picks a threshold from the dtype, None computes every block).
CCE reduces to a sum here and the mean is taken over max(1, valid tokens): CCE's own mean over no valid token is
NaN (its backward divides by that count).
"""

from __future__ import annotations

import torch

from forgather.loss.base import IGNORE_INDEX, CausalLMLoss, require_extra
from forgather.models.checks import is_number


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
        if filter_eps not in ("auto", None) and (not is_number(filter_eps) or not filter_eps >= 0):
            raise ValueError(f"CCELoss(filter_eps={filter_eps!r}): filter_eps takes 'auto', None or a number >= 0, "
                             "e.g. 1e-6")
        require_extra(self.name, "cut-cross-entropy", "cut_cross_entropy")
        self.filter_eps = float(filter_eps) if is_number(filter_eps) else filter_eps  # CCE takes no int eps

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from cut_cross_entropy import linear_cross_entropy

        n_valid = (targets != self.ignore_index).sum().clamp(min=1)
        return linear_cross_entropy(
            hidden, weight, targets, ignore_index=self.ignore_index, softcap=self.softcap,
            reduction="sum", filter_eps=self.filter_eps, impl="cce",
        ) / n_valid

    def extra_repr(self) -> str:
        return f"filter_eps={self.filter_eps!r}, {super().extra_repr()}"
