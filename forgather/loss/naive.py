"""NaiveLoss: the reference. Full logits, upcast to fp32 (fp64 stays), then `F.cross_entropy`; autograd does the rest.

Memory grows as tokens x vocab x (2 + several x 4) bytes; use it to check the others, not to train big vocabs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forgather.loss.base import CausalLMLoss


class NaiveLoss(CausalLMLoss):
    name = "naive"
    supports_z_loss = True
    supports_softcap = True

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        valid = targets != self.ignore_index
        n_valid = valid.sum().clamp(min=1)
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        if self.z_loss:
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + self.z_loss * (lse.square() * valid).sum()
        return loss / n_valid
