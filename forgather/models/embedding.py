"""Token embedding: ids [B, T] -> vectors [B, T, H].

`weight` is a plain [V, H] parameter, so a tied LM head can use it as its output projection.

`sparse_grad=True` gives the weight the lookup's gradient as a sparse tensor (the rows looked up): where a tied
head's dense gradient reaches the same weight in the same backward, autograd adds the rows into it, instead of
writing a dense [V, H] gradient of the lookup (mostly zeros) and adding the two (CausalLM chooses this). Where no
dense gradient joins it, the weight's accumulated gradient is made dense at once, so optimizers and collectives
see what they always do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_sizes


class TokenEmbedding(nn.Module):
    """A lookup table of `vocab_size` vectors of size `hidden_size`, times an optional `scale`.

    `scale` multiplies the looked-up vectors (Gemma uses sqrt(hidden_size)); 1.0 leaves them unchanged.
    """

    def __init__(self, vocab_size: int, hidden_size: int, scale: float = 1.0, init_std: float = 0.02):
        super().__init__()
        positive_sizes("TokenEmbedding", vocab_size=vocab_size, hidden_size=hidden_size)
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, input_ids: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
        if sparse_grad:
            # Asked of the parameter itself: a copied or reloaded module's weight carries no hooks.
            hooks = self.weight._post_accumulate_grad_hooks
            if not hooks or _dense_grad not in hooks.values():
                self.weight.register_post_accumulate_grad_hook(_dense_grad)
        x = F.embedding(input_ids, self.weight, sparse=sparse_grad)
        return x * self.scale if self.scale != 1.0 else x


def _dense_grad(weight: torch.Tensor) -> None:
    """A sparse gradient left alone in `.grad` (no tied head's joined it) made dense, as optimizers expect."""
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()
