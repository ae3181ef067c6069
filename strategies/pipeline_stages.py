"""Stage modules cut from a whole model, from outside the model's code (torchtitan style).

Two kinds of model are understood, each by a small "stages" object that knows how to cut it, feed it a
batch and score its output:
- `CausalLMStages`: a `forgather.models.causal_lm.CausalLM` (anything with `embed`, `layers`, `norm`,
  `lm_head`, `lm_head_weight` and `layer_inputs`) with a causal-LM loss `loss(hidden, weight, labels)`. The
  first stage embeds `input_ids`; every stage rebuilds RoPE and the attention mask from `position_ids` (passed
  to every stage); the last stage applies the final norm and holds the output head. Batches are dicts with
  `input_ids`, optional `position_ids` and `labels` (default: the input ids).
- `SequentialStages`: an `nn.Sequential` (its children run in order) with `loss(output, target)`; batches are
  `(inputs, target)` pairs.
A tied head (the embedding matrix, `lm_head` None) lives on the first stage and, as the same module, on the
last stage; the pipeline keeps the two copies equal by summing their gradients (see pipeline_runtime.py).

`prune_to(model, modules)` drops every parameter-holding submodule that no kept module needs, in place; the
others keep their names, so a rank's `state_dict()` is its share of the whole model's, key for key.
`restore(model, removed)` puts the dropped ones back.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from forgather.loss.base import IGNORE_INDEX


class CausalLMStage(nn.Module):
    """Layers `layers` of a CausalLM, with the embedding on the first stage and norm + head on the last.

    forward(x, position_ids=None): x is `input_ids` [B, T] on the first stage, hidden states [B, T, H]
    elsewhere; returns hidden states [B, T, H] (final-normed on the last stage).
    """

    def __init__(self, model: nn.Module, layers: range, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.layer_indices = layers
        self.embed = model.embed if is_first or (is_last and model.lm_head is None) else None
        self.embedding_dropout = model.embedding_dropout if is_first else None
        self.layers = nn.ModuleList(model.layers[index] for index in layers)
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        self.is_first, self.is_last = is_first, is_last
        self.activation_checkpointing = model.activation_checkpointing
        # A bound method, not a submodule: RoPE and the mask builder hold no weights of this stage.
        self._layer_inputs = model.layer_inputs

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, H] of the last stage (the embedding matrix when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # layer_inputs reads only the [B, T] shape and the device of its first argument.
        rope, mask = self._layer_inputs(x if self.is_first else x[..., 0], position_ids)
        if self.is_first:
            x = self.embedding_dropout(self.embed(x))
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask)
        return self.norm(x) if self.is_last else x


class SequentialStage(nn.Module):
    """A run of consecutive children of an nn.Sequential."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


class CausalLMStages:
    """How to pipeline a CausalLM trained with a causal-LM loss (see the module docstring)."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        self.model, self.loss = model, loss
        self.ignore_index = getattr(loss, "ignore_index", IGNORE_INDEX)

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def tied_head(self) -> bool:
        """Whether the output head is the embedding matrix (so first and last stage share it)."""
        return self.model.lm_head is None

    @property
    def head_cost(self) -> float:
        """The output head's weight count in layers: its matmul costs about that many layers' worth."""
        head = self.model.lm_head_weight.numel()
        layer = sum(p.numel() for p in self.model.layers[0].parameters())
        return head / max(layer, 1)

    def stage(self, layers: range, is_first: bool, is_last: bool) -> CausalLMStage:
        return CausalLMStage(self.model, layers, is_first, is_last)

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, torch.Tensor], torch.Tensor]:
        """(first-stage args, every-stage kwargs, loss target) of a batch."""
        kwargs = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
        return (batch["input_ids"],), kwargs, batch.get("labels", batch["input_ids"])

    def count(self, target: torch.Tensor) -> torch.Tensor:
        """How many terms the loss averages over: next-token targets that are not ignored."""
        return (target[:, 1:] != self.ignore_index).sum()

    def stage_loss(self, stage: CausalLMStage, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output, stage.head_weight, target)


class SequentialStages:
    """How to pipeline an nn.Sequential trained with a row-mean `loss(output, target)`."""

    def __init__(self, model: nn.Sequential, loss: Callable[..., torch.Tensor]) -> None:
        self.model, self.loss = model, loss
        self.head_cost = 0.0
        self.tied_head = False

    @property
    def num_layers(self) -> int:
        return len(self.model)

    def stage(self, layers: range, is_first: bool, is_last: bool) -> SequentialStage:
        return SequentialStage([self.model[index] for index in layers])

    def inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[tuple, dict, torch.Tensor]:
        inputs, target = batch
        return (inputs,), {}, target

    def count(self, target: torch.Tensor) -> torch.Tensor:
        return torch.tensor(target.shape[0], device=target.device)

    def stage_loss(self, stage: SequentialStage, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output, target)


def stages_for(model: nn.Module, loss: Callable[..., torch.Tensor]) -> CausalLMStages | SequentialStages:
    """The stages object that understands `model`."""
    if all(hasattr(model, name) for name in ("embed", "layers", "norm", "lm_head", "layer_inputs")):
        return CausalLMStages(model, loss)
    if isinstance(model, nn.Sequential):
        return SequentialStages(model, loss)
    raise TypeError(
        f"cannot cut a {type(model).__name__} into pipeline stages: give a forgather CausalLM (embed, layers, "
        "norm, lm_head, layer_inputs) or an nn.Sequential"
    )


def prune_to(model: nn.Module, modules: list[nn.Module]) -> dict[str, nn.Module]:
    """Set to None every submodule of `model` holding parameters that none of `modules` contains.

    Returns the removed submodules by qualified name, so that `restore` can put them back.
    """
    kept: set[int] = {id(sub) for module in modules for sub in module.modules()}
    removed: dict[str, nn.Module] = {}
    _prune(model, kept, "", removed)
    return removed


def _prune(module: nn.Module, kept: set[int], prefix: str, removed: dict[str, nn.Module]) -> None:
    for name, child in list(module.named_children()):
        if id(child) in kept:
            continue
        if any(id(sub) in kept for sub in child.modules()):
            _prune(child, kept, f"{prefix}{name}.", removed)
        elif any(True for _ in child.parameters()):
            removed[prefix + name] = child
            setattr(module, name, None)


def restore(model: nn.Module, removed: dict[str, nn.Module]) -> None:
    """Put submodules removed by `prune_to` back in place."""
    for name, child in removed.items():
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, child)
