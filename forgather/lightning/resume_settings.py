"""`ConfiguredOptimizerSettings`: a resumed run trains with the optimizer settings its config gives.

Lightning restores an optimizer's parameter groups whole from the checkpoint, so `--resume RUN lr=1e-4` (or
weight_decay, betas, eps ...) would go on with the values the run started with, saying nothing. This callback
reads the groups as the config built them (`on_fit_start`, after `configure_optimizers`, before Lightning
restores the checkpoint's) and, once restored (`on_train_start`), puts back every value the config changed,
with one line saying which. The learning rate of a scheduled group is its base (`initial_lr`, which the
scheduler multiplies): the scheduler's `base_lrs` take the new one and the current rate is scaled by the same
ratio, so the schedule goes on from the step it reached, with the new peak. A resume with the run's own settings
changes nothing, and stays exact. Works in plain Lightning code.

It also records in each checkpoint the class of every optimizer (`state_dict`): a resume whose config builds
another one (`--resume RUN optimizer._target_=...`) would have Lightning load the old optimizer's state into the
new one, which fails at its first step on a key of the other's (a bare `KeyError: 'momentum'`). It is refused in
one line before any state is loaded, naming both classes (checkpoints written before the record are not checked).
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from forgather.errors import UserError


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return bool(a == b)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: copy.deepcopy(value) for key, value in group.items() if key != "params"}


def _class_name(optimizer: Any) -> str:
    """The optimizer's class as an import path; Lightning's wrapper (LightningOptimizer) names what it wraps."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


class ConfiguredOptimizerSettings(pl.Callback):
    def __init__(self) -> None:
        self.configured: list[list[dict[str, Any]]] = []
        self.classes: list[str] | None = None  # this fit's optimizers (on_fit_start)
        self.recorded: list[str] | None = None  # the checkpoint's (load_state_dict)
        self.checkpoint: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.classes = self.recorded = None  # this fit's, not an earlier fit's of the same callback

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": self.classes} if self.classes is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recorded = state_dict.get("optimizers")
        self._check_classes()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.configured = [[_settings(group) for group in optimizer.param_groups] for optimizer in trainer.optimizers]
        self.classes = [_class_name(optimizer) for optimizer in trainer.optimizers]
        self.checkpoint = trainer.ckpt_path
        self._check_classes()  # Lightning loads callback states before this hook, or after it for some strategies

    def _check_classes(self) -> None:
        if self.recorded is None or self.classes is None or self.recorded == self.classes:
            return
        recorded, classes, self.recorded = self.recorded, self.classes, None
        raise UserError(f"{self.checkpoint or 'the checkpoint'}: its optimizer is {', '.join(recorded)}, this config's "
                        f"{', '.join(classes)}; a resume goes on with the optimizer's state, which only the optimizer "
                        f"that wrote it reads ; resume with the run's optimizer, or train this one in a new run "
                        f"(python -m forgather.run --from-snapshot RUN_DIR OVERRIDES)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        changed: list[str] = []
        for optimizer, groups in zip(trainer.optimizers, self.configured):
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs if config.scheduler.optimizer is optimizer]
            for index, (group, wanted) in enumerate(zip(optimizer.param_groups, groups)):
                for line in _put_back(group, wanted, [s.base_lrs for s in schedulers if hasattr(s, "base_lrs")], index):
                    if line not in changed:
                        changed.append(line)
        if changed:
            changed.sort(key=lambda line: not line.startswith("lr="))  # the learning rate first
            rank_zero_info(f"resuming with the config's {', '.join(changed)}: the optimizer goes on with it")


def _put_back(group: dict[str, Any], wanted: dict[str, Any], base_lrs: list[list[float]], index: int) -> list[str]:
    """Set in the restored `group` (the `index`-th of its optimizer, whose schedulers hold `base_lrs`) each
    value the config gave that differs; a line saying each."""
    lines = []
    for key, value in wanted.items():
        # A scheduled group's "lr" is the schedule's current rate: its base, "initial_lr", is compared.
        if key not in group or (key == "lr" and "initial_lr" in wanted) or _same(group[key], value):
            continue
        restored = copy.deepcopy(group[key])
        _assign(group, key, value)
        if key == "initial_lr":
            if float(restored):
                _assign(group, "lr", group["lr"] * float(value) / float(restored))
            for rates in base_lrs:
                rates[index] = float(value)
        lines.append(f"{'lr' if key == 'initial_lr' else key}={_text(value)} (the checkpoint's: {_text(restored)})")
    return lines


def _assign(group: dict[str, Any], key: str, value: Any) -> None:
    """A tensor setting is changed in place: a fused or captured optimizer step may hold its address."""
    if isinstance(group[key], torch.Tensor):
        group[key].copy_(torch.as_tensor(value, dtype=group[key].dtype))
    else:
        group[key] = copy.deepcopy(value)


def _text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return repr(value) if not isinstance(value, float) else f"{value:g}"
