"""Checks of a model's hyperparameters, worded for the user: a bad size fails when the model is built, with the
name and value that were given, instead of deep inside torch (a negative width used to surface as
"Trying to create tensor with negative dimension")."""

from __future__ import annotations

from typing import Any


def is_number(value: object) -> bool:
    """Whether `value` is an int or a float, not a bool (a `true` in a config is no rate or size): the test every
    check of a numeric argument starts with, here and in forgather.optim and forgather.loss."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def probabilities(owner: str, **values: Any) -> None:
    """Raise ValueError naming `owner` and the first of `values` (dropout rates) that is not a number in [0, 1]."""
    for name, value in values.items():
        if not is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{owner}: {name}={value!r} must be a probability between 0 and 1 (0 turns it off)")


def positive_sizes(owner: str, **sizes: Any) -> None:
    """Raise ValueError naming `owner` and the first of `sizes` that is not a positive int (None is skipped)."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")
