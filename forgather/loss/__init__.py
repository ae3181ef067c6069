"""Causal-LM losses from hidden states, the output projection weight and the input ids.

Every loss is a `CausalLMLoss`: `loss(hidden [B, T, H], weight [V, H], labels [B, T]) -> scalar`, the mean
cross-entropy over the positions whose next-token label is not `ignore_index`; labels are the input ids and
the shift by one happens inside, once. Implementations, one module each:

    naive     NaiveLoss     logits, then cross-entropy: the reference (memory: tokens x vocab in fp32)
    chunked   ChunkedLoss   pure PyTorch, gradients computed chunk by chunk in forward, `torch.compile`d
    liger     LigerLoss     Liger-Kernel's fused linear cross-entropy (extra: forgather[gpu])
    cce       CCELoss       Apple's Cut-Cross-Entropy (extra: forgather[gpu])
    fused     FusedLoss     the default fused loss on GPU: the best measured choice, tuned (docs/benchmarks.md)

Names resolve lazily: importing this package imports neither torch nor any optional GPU package.
"""

from __future__ import annotations

from typing import Any

from forgather.lazy import lazy_exports

_EXPORTS = {
    "CausalLMLoss": "base",
    "MissingExtraError": "base",
    "NaiveLoss": "naive",
    "ChunkedLoss": "chunked",
    "LigerLoss": "liger",
    "CCELoss": "cce",
    "FusedLoss": "fused",
}

# The short names that configs and `get_loss` use (conf/loss/<name>.yaml).
LOSSES = {
    "naive": "NaiveLoss",
    "chunked": "ChunkedLoss",
    "liger": "LigerLoss",
    "cce": "CCELoss",
    "fused": "FusedLoss",
}

__all__ = [*_EXPORTS, "LOSSES", "get_loss"]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def get_loss(name: str, **kwargs: Any) -> Any:
    """Build the loss registered under `name` (one of LOSSES) with `kwargs`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return __getattr__(LOSSES[name])(**kwargs)
