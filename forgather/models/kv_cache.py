"""Key/value cache for incremental decoding.

`KVCache(num_layers)` holds one `LayerKVCache` per layer plus the positions and document ids of every
cached token, which the next step's attention mask needs. Tensors grow by concatenation along the sequence
axis: simple and exact; generation here is for samples and tests, not a serving engine.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """The keys and values one attention layer has seen, each [B, kv_heads, L, head_dim]."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values; return everything cached so far."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat((self.keys, keys), dim=2)
            self.values = torch.cat((self.values, values), dim=2)
        return self.keys, self.values


class KVCache:
    """Per-layer caches plus `position_ids` [B, L] and `document_ids` [B, L] (None: one document a row)."""

    is_compileable = False  # read by transformers' generate(); this cache grows, so it cannot be compiled

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKVCache() for _ in range(num_layers)]
        self.position_ids: torch.Tensor | None = None
        self.document_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.position_ids is None else self.position_ids.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The number of cached tokens (the name transformers' generate() calls)."""
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows `beam_idx` selects, in that order (transformers' beam search calls this)."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[beam_idx], layer.values[beam_idx]
        self.position_ids = self.position_ids[beam_idx]
        if self.document_ids is not None:
            self.document_ids = self.document_ids[beam_idx]

    def record(self, position_ids: torch.Tensor, document_ids: torch.Tensor | None) -> None:
        """Remember the new tokens' positions and the document ids of all tokens so far."""
        if self.position_ids is not None:
            position_ids = torch.cat((self.position_ids, position_ids), dim=1)
        self.position_ids = position_ids
        self.document_ids = document_ids
