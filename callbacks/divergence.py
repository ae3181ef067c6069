"""`StopOnDivergence`: a run whose weights stop being finite ends there, and never saves them.

A diverged run (a loss spike into inf, then NaN weights) otherwise trains on in NaN to max_steps: every
checkpoint after the divergence holds NaN weights, `keep_checkpoints=N` then removes the last good ones, and
the exported model is NaN. Here:

- Before any checkpoint is written (`on_save_checkpoint`, on every rank, as Lightning dumps one), its model
  weights are checked: one reduction per device, read once, while the save waits for the GPU anyway. A weight
  that is not finite stops the run with `TrainingDiverged` instead of the write: the newest checkpoint on disk
  is then the last finite state. Ranks decide together (a sharded model's ranks hold different weights).
- When training ends, the final weights, so that a run whose divergence no checkpoint or written step saw does
  not end as a finished one.
- On one device, between checkpoints: when a training metric the loggers got (`train/loss`,
  `train/grad_norm`, read without a host wait by `forgather.lightning.steps.DeferredMetrics`) is not finite,
  the weights are checked then, so a diverged run stops within a logging interval. A non-finite loss with
  finite weights (a step skipped by fp16's gradient scaler) goes on.

The error names the step, the first weight that is not finite, the newest checkpoint, and how to resume from
it or roll back to an earlier one (`--resume RUN_DIR --checkpoint STEP`, with the steps kept). Works in plain
Lightning code (the checkpoint check; the early check needs a module with `deferred_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from forgather.errors import UserError


class TrainingDiverged(UserError):
    def __init__(self, message: str, step: int, checkpoint: str | None, rank: int) -> None:
        super().__init__(message)
        self.step, self.checkpoint, self.rank = step, checkpoint, rank


def first_nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating tensor that holds a NaN or an infinity, or None; one host wait per device."""
    tensors = []
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if hasattr(tensor, "to_local"):  # a DTensor (FSDP2, the pipeline strategy's checkpoints): this rank's shard
                tensor = tensor.to_local()
            elif hasattr(tensor, "local_tensor"):  # a ShardedTensor (FSDP1's sharded state dict)
                tensor = tensor.local_tensor()
            tensors.append((name, tensor))
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in tensors:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next(name for name, tensor in tensors if not bool(torch.isfinite(tensor).all()))


class StopOnDivergence(pl.Callback):
    def __init__(self, metrics: tuple[str, ...] = ("train/loss", "train/grad_norm")) -> None:
        if isinstance(metrics, str):
            raise ValueError(f"StopOnDivergence(metrics={metrics!r}): metrics takes a tuple of metric names, "
                             f"e.g. ({metrics!r},)")
        names = tuple(metrics) if isinstance(metrics, Iterable) else None
        if names is None or not all(isinstance(name, str) for name in names):
            raise ValueError(f"StopOnDivergence(metrics={metrics!r}): metrics takes a tuple of metric names, "
                             f"e.g. ('train/loss', 'train/grad_norm'), or () to check the weights only at checkpoints")
        self.metrics = names
        self._seen: object = None  # the metrics dict last looked at

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        weights = checkpoint.get("state_dict") or dict(pl_module.state_dict())
        self._check(trainer, weights.items(), "")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The final weights, which no checkpoint or written step may have seen since they diverged: a run ending
        # in NaN fails here instead of passing for a finished one (before an export on fit's end saves them).
        self._check(trainer, pl_module.named_parameters(), "")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        deferred = getattr(pl_module, "deferred_metrics", None)
        last = getattr(deferred, "last", None)
        if trainer.world_size != 1 or not last or last is self._seen:
            return  # several ranks: each logs its own loss, so only the checkpoints' collective check decides
        self._seen = last
        bad = [f"{name} is {value}" for name, value in last.items() if name in self.metrics and not math.isfinite(value)]
        if bad:
            self._check(trainer, pl_module.named_parameters(), f" ({', '.join(bad)})")

    def _check(self, trainer: pl.Trainer, named: Iterable[tuple[str, Any]], seen: str) -> None:
        name = first_nonfinite(named)
        if not trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            return
        step = trainer.global_step
        newest, steps = _newest_checkpoint(trainer)
        what = f"{name} holds NaN or inf" if name else "another rank's weights hold NaN or inf"
        run_dir = Path(newest).parent.parent if newest and Path(newest).parent.name == "checkpoints" else "RUN_DIR"
        earlier = (f"; to go back further (its optimizer state may already be harmed), roll back to an earlier one: "
                   f"--resume {run_dir} --checkpoint STEP lr=... (steps kept: {steps})" if steps else "")
        kept = (f"the newest checkpoint, {newest}, holds the last finite weights: resume from it with a lower "
                f"learning rate or a longer warmup (python -m forgather.run --resume {run_dir} lr=...){earlier}" if newest
                else "no checkpoint was saved before it: start over with a lower learning rate or a longer warmup")
        raise TrainingDiverged(f"training diverged by step {step}: {what}{seen}, so nothing of it is saved ; {kept}",
                               step, newest, trainer.global_rank)


def _newest_checkpoint(trainer: pl.Trainer) -> tuple[str | None, str]:
    """The newest checkpoint of the trainer's checkpoint callbacks (their directories are read: the paths
    they record already name the checkpoint being refused), and the steps of those before it ("" if none)."""
    from forgather.run import steps_list, checkpoints_newest_first, readable_step  # the runner's rules

    found = [checkpoints_newest_first(callback.dirpath) for callback in trainer.checkpoint_callbacks
             if getattr(callback, "dirpath", None)]
    newest = [paths[0] for paths in found if paths]
    if not newest:
        return None, ""
    chosen = max(newest, key=lambda p: p.stat().st_mtime_ns)
    newest_step = readable_step(chosen)
    steps = {step for paths in found for path in paths if (step := readable_step(path)) is not None and step != newest_step}
    return str(chosen), steps_list(sorted(steps)) if steps else ""
