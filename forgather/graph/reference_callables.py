"""The reference Forgather's built-in callables, for its templates' bare targets.

The reference resolves a bare target that is not a Python builtin from a small table of its own
(`CallableNode.BUILT_INS` in its latent.py): `!call:getitem [*models, 'model']` picks an entry of a
constructed mapping, `!partial:call [...]` calls a callable, `!singleton:values [...]` lists a mapping's
values. Its projects use them (the tiny_llama tutorial, tiny_experiments, finetune), so they resolve here
too: `imports.REFERENCE_CALLABLES` maps each bare name to a real import spec, so construction and the
generated code import the same function. `getitem` is `operator.getitem`; the rest, which the standard
library lacks as functions (`operator.call` is Python 3.11+), are below.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping


def items(mapping: Mapping) -> Any:
    """`mapping.items()`."""
    return mapping.items()


def keys(mapping: Mapping) -> Any:
    """`mapping.keys()`."""
    return mapping.keys()


def values(mapping: Mapping) -> Any:
    """`mapping.values()`."""
    return mapping.values()


def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`: `!partial:call [fn]` defers a call to a callable built elsewhere."""
    return function(*args, **kwargs)
