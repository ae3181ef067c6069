"""A project-local layer: Sandwich-LN (Ding et al., 2021, CogView), pre-LN with a second norm on each
sublayer's output before it joins the residual stream: x + norm2(sublayer(norm1(x))).

It takes the library's layer factory signature, so a config swaps it in for PreLNLayer with
`!partial:.sandwich_layer:SandwichLayer@layer_factory` (here: `-- set layer_class = '.sandwich_layer:SandwichLayer'`).
"""

from __future__ import annotations

import torch

from forgather.models.layers import TransformerLayer


class SandwichLayer(TransformerLayer):
    def __init__(self, hidden_size: int, attention_factory, feedforward_factory, norm_factory, **kwargs) -> None:
        super().__init__(hidden_size, attention_factory, feedforward_factory, norm_factory, **kwargs)
        self.attention_output_norm = norm_factory(hidden_size)
        self.feedforward_output_norm = norm_factory(hidden_size)

    def forward(self, x: torch.Tensor, rope, mask, kv_cache=None) -> torch.Tensor:
        attention = self.attention(self.attention_norm(x), rope, mask, kv_cache)
        x = self.residual_dropout(x) + self.dropout(self.attention_output_norm(attention))
        feedforward = self.feedforward(self.feedforward_norm(x))
        return self.residual_dropout(x) + self.dropout(self.feedforward_output_norm(feedforward))
