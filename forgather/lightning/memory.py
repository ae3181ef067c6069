"""Refuse a batch whose activations cannot fit in the device's memory, before the forward allocates them.

A `block_size` or `batch_size` typed one order of magnitude too large otherwise runs the host out of memory
(the OOM killer, swapping) instead of failing. The estimate is a lower bound, so it never refuses a run that
fits: per token, what a pre-LN transformer layer keeps for the backward pass is at least
`ACTIVATIONS_PER_LAYER` x hidden values (normed inputs, q/k/v, attention output, the feed-forward's wide
activations); activation checkpointing keeps one hidden vector per layer plus one layer's worth; the
logits add `vocab_size` values per token (fused losses avoid them, which the lower bound ignores only by
counting them once). Evaluation keeps one layer's activations at a time. Weights and optimizer state are
not counted. The limit is the device's total memory (all of the host's RAM on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sized

import torch
from torch import nn

from forgather.errors import MachineError

ACTIVATIONS_PER_LAYER = 16


def device_memory(device: torch.device) -> int:
    """Total bytes of memory of `device` (a CUDA device, else the host's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(model: nn.Module, rows: int, tokens: int, bytes_per_value: int, training: bool) -> int | None:
    """Lower bound of the activation memory of one forward (+ backward) over a [rows, tokens] batch; None
    for a model without `hidden_size`, `vocab_size` and a list of `layers`."""
    hidden, vocab, layers = (getattr(model, name, None) for name in ("hidden_size", "vocab_size", "layers"))
    if not (isinstance(hidden, int) and isinstance(vocab, int) and isinstance(layers, Sized)):  # `layers`: a count elsewhere
        return None
    per_layer = ACTIVATIONS_PER_LAYER * hidden
    if not training:
        per_token = per_layer + vocab
    elif getattr(model, "activation_checkpointing", False):
        per_token = len(layers) * hidden + per_layer + vocab
    else:
        per_token = len(layers) * per_layer + vocab
    return rows * tokens * per_token * bytes_per_value


def check_batch_fits(model: nn.Module, batch_shape: torch.Size, device: torch.device, bytes_per_value: int, training: bool) -> None:
    """Raise MachineError when a [rows, tokens] batch's activations exceed the device's memory."""
    rows, tokens = batch_shape
    needed = activation_bytes(model, rows, tokens, bytes_per_value, training)
    limit = device_memory(device)
    if needed is not None and needed > limit:
        gib = 2**30
        raise MachineError(
            f"a batch of {rows} x {tokens} tokens (batch_size x block_size) needs at least {needed / gib:.1f} GiB of "
            f"activations to {'train' if training else 'evaluate'}, and the {device.type} device has "
            f"{limit / gib:.1f} GiB ; lower block_size or batch_size"
        )
