"""Key/value cache for incremental decoding.

`KVCache(num_layers)` holds one `LayerKVCache` per layer plus the positions and document ids of every
cached token, which the next step's attention mask needs. Tensors grow by concatenation along the sequence
axis: simple and exact; generation here is for samples and tests. `SlotKVCache` is the serving engine's
preallocated cache (forgather/serve/engine.py): fixed slots, each holding one sequence.
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


class SlotKVCache:
    """A preallocated cache for a serving engine: `slots` sequences of up to `length` tokens each.

    Keys and values of layer i live in `keys[i]` / `values[i]`, [slots, kv_heads, length + 1, head_dim]; a
    token at position p of the sequence in slot s sits at [s, :, p]. Both are views of one tensor,
    `pairs[i]` [2, slots, kv_heads, length + 1, head_dim], so a step can write a token's key and value with one
    scatter. Nothing is ever reallocated, so a decode step reads and writes the same memory every time (what
    a captured CUDA graph needs). The extra position `length` is scratch: rows of a batch that hold no
    sequence write there, and no real token ever does. `rows(slots, positions, keys)` is the view one forward
    pass uses.
    """

    def __init__(self, num_layers: int, slots: int, length: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (2, slots, kv_heads, length + 1, head_dim)
        self.pairs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keys = [pair[0] for pair in self.pairs]
        self.values = [pair[1] for pair in self.pairs]
        self.slots, self.length = slots, length

    @property
    def scratch(self) -> int:
        return self.length

    def rows(self, slots: slice | torch.Tensor, positions: torch.Tensor, keys: int | None = None) -> "SlotRows":
        """The slots a batch's rows use (a slice, or a tensor of slot indices), whose new tokens sit at
        `positions` [rows, T]; attention reads their first `keys` positions (default all: length + 1)."""
        return SlotRows(self, slots, positions, self.length + 1 if keys is None else keys)


class SlotRows:
    """A forward pass's window on a SlotKVCache: `layers[i].update(k, v)` (Forgather layers) and
    `update(k, v, layer_idx, ...)` (transformers' attention) write the new keys/values at their positions and
    return the first `keys` cached positions of those slots, [count, kv_heads, keys, head_dim] (reading less
    of the cache when every sequence is short); the attention mask hides the positions past each row's own.
    A slice of slots is read in place (the decode step); a tensor of slot indices gathers their windows (a
    prefill of several prompts)."""

    def __init__(self, cache: SlotKVCache, slots: slice | torch.Tensor, positions: torch.Tensor, keys: int) -> None:
        self.cache, self.slots, self.positions, self.keys = cache, slots, positions, keys
        if isinstance(slots, slice):
            self.batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.layers = [_LayerRows(self, index) for index in range(len(cache.keys))]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [rows, kv_heads, T, D] -> [rows, T, kv_heads, D]: the layout advanced indexing on dims 0 and 2 gives
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        if isinstance(self.slots, slice):
            cached_keys, cached_values = self.cache.keys[layer][self.slots], self.cache.values[layer][self.slots]
            cached_keys[self.batch_index, :, self.positions] = keys.to(cached_keys.dtype)
            cached_values[self.batch_index, :, self.positions] = values.to(cached_values.dtype)
            return cached_keys[:, :, :self.keys], cached_values[:, :, :self.keys]
        all_keys, all_values = self.cache.keys[layer], self.cache.values[layer]
        all_keys[self.slots[:, None], :, self.positions] = keys.to(all_keys.dtype)
        all_values[self.slots[:, None], :, self.positions] = values.to(all_values.dtype)
        return all_keys[self.slots, :, :self.keys], all_values[self.slots, :, :self.keys]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.write(layer_idx, keys, values)


class _LayerRows:
    def __init__(self, rows: SlotRows, index: int) -> None:
        self.rows, self.index = rows, index

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.write(self.index, keys, values)
