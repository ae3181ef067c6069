"""A config's keyword values against the callable's annotations (forgather/graph/annotations.py): certain
mismatches refused at the node, in one line; whatever a library may still accept left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import pytest
import torch

from forgather.graph.annotations import describe, fits, mismatch, parameters_of
from forgather.graph.construct import ConstructError, construct


@pytest.mark.parametrize("value, annotation", [
    ("abc", float), ("abc", int), ("abc", Optional[int]), ("abc", Union[float, torch.Tensor]), ("abc", bool),
    ("abc", tuple[float, float]), (0.9, tuple[float, float]), ([0.9, 0.95, 0.99], tuple[float, float]),
    (["a", 0.95], tuple[float, float]), ("sum ", Literal["mean", "sum"]), (3, Literal["mean", "sum"]),
    (1.5, Optional[Literal[1, 2]]),
])
def test_certain_mismatches(value, annotation):
    assert fits(value, annotation) is False


@pytest.mark.parametrize("value, annotation", [
    (1, float), (True, float), (1e-3, Union[float, torch.Tensor]), ([0.9, 0.95], tuple[float, float]),
    ((0.9, 0.95), tuple[float, ...]), ("sum", Literal["mean", "sum"]), (None, Optional[int]), ("x", str),
    (16, Literal[16, "16"]), ("16", Literal[16, "16"]),
])
def test_values_that_fit(value, annotation):
    assert fits(value, annotation) is True


@pytest.mark.parametrize("value, annotation", [
    ("out", Path),  # a library annotating Path commonly takes a str
    (None, int),  # ... and an int None
    (2.0, torch.Tensor),  # ... and a tensor a number
    ("cpu", torch.device), ("bfloat16", torch.dtype), (3, str), ("x", "SomeForwardRef"),
    ([1, 2], list[str]), ({"a": 1}, dict), ("abc", Union[int, Path]),
])
def test_what_a_library_may_still_accept_is_left_alone(value, annotation):
    assert fits(value, annotation) is not False


def test_annotations_are_described_as_written():
    assert describe(tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]) == "tuple[float | Tensor, float | Tensor]"
    assert describe(Optional[int]) == "int | None"
    assert describe(Literal["mean", "sum"]) == "'mean' | 'sum'"


def test_a_literal_mismatch_suggests_the_close_choice():
    def loss(reduction: Literal["mean", "sum", "none"] = "mean"):
        return reduction

    parameters = parameters_of(loss)
    assert mismatch(parameters, "loss", {"reduction": "suum"}) == ("loss's parameter 'reduction' takes 'mean' | "
                                                                  "'sum' | 'none'; got str 'suum'; did you mean 'sum'?")
    assert mismatch(parameters, "loss", {"reduction": "sum"}) is None


def test_a_partial_with_a_wrong_value_is_refused_at_its_node_not_when_lightning_calls_it():
    config = {"optimizer": {"_target_": "torch.optim:AdamW", "_partial_": True, "weight_decay": "abc"}}
    with pytest.raises(ConstructError) as caught:
        construct(config, "optimizer")
    assert caught.value.path == "optimizer"
    assert "AdamW's parameter 'weight_decay' takes float; got str 'abc'" in caught.value.message
    config["optimizer"]["weight_decay"] = 0.01
    assert construct(config, "optimizer").keywords == {"weight_decay": 0.01}


def test_a_callable_whose_annotations_cannot_be_resolved_is_left_to_its_call():
    namespace = {}
    exec("def f(x: 'OnlyForTypeCheckers' = 1):\n    return x\n", namespace)
    assert mismatch(parameters_of(namespace["f"]), "f", {"x": "abc"}) is None
