"""Transformer layers: attention and feed-forward sublayers around a residual stream.

`layer(x [B, T, H], rope, mask, kv_cache) -> [B, T, H]`. A layer is built by `layer_factory(hidden_size)`,
where the factory is a partial carrying `attention_factory`, `feedforward_factory` and `norm_factory`, each
called with `hidden_size`. Any class with this constructor and forward (a project-local one too) can
replace these through the same factory.

A layer with `carries_residual = True` (PreLNLayer) also takes the residual stream as a pair: `layer(x, rope,
mask, kv_cache, delta=d, carry=True) -> (x', d')` computes the same as `layer(x + d, ...) = x' + d'`, with the
sum left to the next consumer: the next layer's first norm (or the model's final one) adds and normalizes in
one kernel (`add_and_norm`), so the stream's add is no kernel of its own, forward or backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import AttentionMask
from .checks import probabilities
from .kv_cache import LayerKVCache
from .norm import add_and_norm


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


class TransformerLayer(nn.Module):
    """The parts every layer variant shares; subclasses define where the norms go in `forward`.

    Args:
        hidden_size: model width; passed to each factory.
        attention_factory: `attention_factory(hidden_size)` -> an attention module (`attention.Attention`).
        feedforward_factory: `feedforward_factory(hidden_size)` -> a feed-forward module (`SwiGLU`, `GELUMLP`).
        norm_factory: `norm_factory(hidden_size)` -> a norm (`RMSNorm`, `LayerNorm`); called twice.
        dropout: dropout on each sublayer's output before it joins the residual stream.
        residual_dropout: dropout on the residual stream itself (Residual Dropout, Guo et al., 2024).
    """

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[[int], nn.Module],
        feedforward_factory: Callable[[int], nn.Module],
        norm_factory: Callable[[int], nn.Module],
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
    ):
        super().__init__()
        probabilities(type(self).__name__, dropout=dropout, residual_dropout=residual_dropout)
        self.attention = attention_factory(hidden_size)
        self.feedforward = feedforward_factory(hidden_size)
        self.attention_norm = norm_factory(hidden_size)
        self.feedforward_norm = norm_factory(hidden_size)
        self.dropout = _dropout(dropout)
        self.residual_dropout = _dropout(residual_dropout)


class PreLNLayer(TransformerLayer):
    """Pre-LN (Xiong et al., 2020; GPT-2, Llama): x + sublayer(norm(x)); trains stably without warmup tricks.

    Takes and gives the residual stream as a pair on request (`delta`, `carry`: see the module's docstring)."""

    carries_residual = True

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache: LayerKVCache | None = None,
        delta: torch.Tensor | None = None,
        carry: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if delta is None:
            normed = self.attention_norm(x)
        else:
            x, normed = add_and_norm(self.attention_norm, x, delta)
        attended = self.dropout(self.attention(normed, rope, mask, kv_cache))
        x, normed = add_and_norm(self.feedforward_norm, self.residual_dropout(x), attended)
        x, delta = self.residual_dropout(x), self.dropout(self.feedforward(normed))
        return (x, delta) if carry else x + delta


class PostLNLayer(TransformerLayer):
    """Post-LN (Vaswani et al., 2017): norm(x + sublayer(x)), the original Transformer layer."""

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        x = self.attention_norm(self.residual_dropout(x) + self.dropout(self.attention(x, rope, mask, kv_cache)))
        return self.feedforward_norm(self.residual_dropout(x) + self.dropout(self.feedforward(x)))
