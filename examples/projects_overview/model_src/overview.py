"""Project-local helpers for the overview's configs (named `.overview:NAME` there)."""

from torch import nn


def parameter_count(module: nn.Module) -> int:
    """Trainable numbers in `module`, each shared parameter counted once (as `parameters()` yields it)."""
    return sum(parameter.numel() for parameter in module.parameters())
