"""Checking a config's keyword values against the annotations of the callable they go to, at the config's node.

A value of the wrong type written in a template or forced in by an override (`++optimizer.betas=abc`) would
otherwise reach the callable: torch's AdamW, held as a partial until Lightning calls it, then fails with
"'<=' not supported between instances of 'float' and 'str'" and a traceback far from the config. Here it is
one line at the node: "AdamW's parameter 'betas' takes tuple[float | Tensor, float | Tensor]; got str 'abc'".

Only mismatches that are certain are refused, since libraries' annotations are often narrower than what the
code accepts (a `Path` that takes a str, an `int` that takes None):
- a str where the annotation admits only numbers, bools, tensors or None;
- a value outside a `Literal[...]` (with the close names), for str, number and bool values;
- a str or number where a tuple is expected, and the same rules for each element of a tuple given for a
  fixed-length `tuple[...]` annotation.
Everything else (classes, callables, generics, unresolvable string annotations) counts as a fit. No library
does this (typeguard and beartype check whole calls by the annotation's letter, which refuses the
library-accepted cases above), hence this short module.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal, Mapping, Union

from forgather.errors import did_you_mean

_UNKNOWN = None  # "cannot tell": treated as a fit
_NUMERIC = (int, float, complex)


def _is_tensor_class(annotation: Any) -> bool:
    return getattr(annotation, "__module__", "") == "torch" and getattr(annotation, "__name__", "") == "Tensor"


def fits(value: Any, annotation: Any) -> bool | None:
    """True, False (certainly not), or None (cannot tell) for `value` under `annotation`."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return _UNKNOWN
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        results = [fits(value, member) for member in typing.get_args(annotation)]
        if any(result is True for result in results):
            return True
        return _UNKNOWN if any(result is None for result in results) else False
    if origin is Literal:
        if isinstance(value, (str, bool, int, float)):
            return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
        return _UNKNOWN
    if origin is tuple:
        return _fits_tuple(value, typing.get_args(annotation))
    if annotation is None or annotation is type(None):
        return value is None
    if not isinstance(annotation, type):
        return _UNKNOWN
    if isinstance(value, str):
        if annotation is str or issubclass(str, annotation):
            return True
        if annotation in (int, float, complex, bool) or _is_tensor_class(annotation):
            return False
        return _UNKNOWN
    if annotation in (float, complex):
        return True if isinstance(value, _NUMERIC) else _UNKNOWN
    return True if isinstance(value, annotation) else _UNKNOWN


def _fits_tuple(value: Any, members: tuple) -> bool | None:
    if isinstance(value, (str, int, float)):
        return False
    if not isinstance(value, (list, tuple)) or not members:
        return _UNKNOWN
    if len(members) == 2 and members[1] is Ellipsis:
        members = (members[0],) * len(value)
    if len(members) != len(value):
        return False
    results = [fits(item, member) for item, member in zip(value, members)]
    if all(result is True for result in results):
        return True
    return False if any(result is False for result in results) else _UNKNOWN


def describe(annotation: Any) -> str:
    """An annotation as a reader writes it: `tuple[float | Tensor, float | Tensor]`, `'16-mixed' | 'bf16'`."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(dict.fromkeys(describe(member) for member in typing.get_args(annotation)))
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else describe(a) for a in typing.get_args(annotation))}]"
    if annotation is None or annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _literals(annotation: Any) -> list[str]:
    """Every Literal choice inside `annotation`, as text (for a close-name hint)."""
    if typing.get_origin(annotation) is Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return [text for member in typing.get_args(annotation) for text in _literals(member)]


def parameters_of(function: Any) -> Mapping[str, inspect.Parameter] | None:
    """`function`'s parameters with their annotations evaluated where Python can (a string annotation that
    names what only type checkers import stays a string, which fits() cannot judge), or None without a
    signature (builtins and C extensions)."""
    try:
        return inspect.signature(function, eval_str=True).parameters
    except Exception:  # noqa: BLE001 - evaluating an annotation failed, or there is no signature
        pass
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None


def mismatch(parameters: Mapping[str, inspect.Parameter], name: str, kwargs: Mapping[str, Any]) -> str | None:
    """What is wrong with the first keyword value that certainly does not fit its parameter's annotation (of
    `parameters`, from parameters_of), or None. `name` is how the message calls the callable."""
    for key, value in kwargs.items():
        parameter = parameters.get(key)
        if parameter is None or fits(value, parameter.annotation) is not False:
            continue
        hint = did_you_mean(str(value), _literals(parameter.annotation), n=2) if isinstance(value, str) else ""
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return (f"{name}'s parameter {key!r} takes {describe(parameter.annotation)}; got {type(value).__name__} "
                f"{shown}{'; ' + hint if hint else ''}")
    return None
