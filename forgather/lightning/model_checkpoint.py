"""`ModelCheckpoint`: Lightning's, with a `last.ckpt` that resumes exactly where training stopped.

Lightning writes `last.ckpt` with the step checkpoints. When fit ends on a step that is not a checkpoint
step (max_steps reached, `forgather control stop`, early stopping), its `last.ckpt` is the last step
checkpoint (the steps since are trained again after a resume) or, when this fit saved none, one written by
`on_train_end` after the epoch-end hooks ran, which records the epoch as finished: resumed from it, training
starts a new epoch instead of continuing with the next batch. Here `on_train_batch_end` of the batch after which fit ends writes `last.ckpt`, with the loops mid-epoch,
as a step checkpoint is written: resuming from it continues with the next batch and gives the losses of an
uninterrupted run. Lightning runs checkpoint callbacks after the others, so a stop requested by another
callback at this batch is seen.

A checkpoint saved at the end of a training batch first has the step's metrics row written by the loggers
that can (`forgather.lightning.csv_logger.CSVLogger`), which would otherwise be written after it (Lightning's
logger connector after the batch-end hooks; the module's training metrics at the next batch's end,
`forgather.lightning.steps.DeferredMetrics`): a process killed while writing the checkpoint keeps that row,
which the resumed run does not log again. At the first batch of a fit it tells those loggers the step that batch
is logged at, so the rows an earlier process logged from there on are dropped.

A run directory moved or copied elsewhere (another disk, a cluster's other mount point) keeps its checkpoint
bookkeeping when resumed there: the paths a checkpoint recorded under its old directory are read as the same
files in the new one (`load_state_dict`). Lightning drops them instead: `keep_checkpoints` then never removes the
step checkpoints saved before the move, and `last.ckpt`, taken for another run's file, is joined by a
`last-v1.ckpt`. A recorded file the new directory lacks is forgotten, so a resumed copy never removes a file of
the run it was copied from.

Epoch-end and validation-end saving are Lightning's, unchanged. Everything else, arguments included, is
`pytorch_lightning.callbacks.ModelCheckpoint`.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint

from forgather.lightning.csv_logger import CSVLogger
from forgather.lightning.steps import DeferredMetrics, ends_last_epoch, writes_metrics


def fit_ends_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop stops after the current training batch (asked in `on_train_batch_end`)."""
    return trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step or ends_last_epoch(trainer)


class ModelCheckpoint(LightningModelCheckpoint):
    _in_train_batch_end = False
    _first_batch = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._first_batch = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._first_batch:  # the step its row gets is known only now (Lightning's loop moves it on a restart)
            self._first_batch = False
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    logger.resume_at(trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_train_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self.save_last and fit_ends_after_this_batch(trainer) and not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._in_train_batch_end = False

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._in_train_batch_end:
            # The module's training metrics reach the loggers a step late (DeferredMetrics): the earlier step's
            # row goes first, then this step's metrics are read now, as saving waits for the GPU anyway.
            deferred = getattr(trainer.lightning_module, "deferred_metrics", None)
            current = {}
            if isinstance(deferred, DeferredMetrics):
                deferred.flush(trainer)
                current = deferred.now(trainer) if writes_metrics(trainer) else {}
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    logger.log_step_before_checkpoint(trainer, current)
        super()._save_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded = state_dict.get("dirpath")
        if recorded and self.dirpath and recorded != self.dirpath:
            state_dict = relocated(state_dict, recorded, self.dirpath, self.mode)
        super().load_state_dict(state_dict)


def relocated(state: dict[str, Any], old: str, new: str, mode: str) -> dict[str, Any]:
    """A ModelCheckpoint's state with its files under directory `old` named as under `new` where they exist
    there, and forgotten where they do not (the worst of the top k kept recomputed, as Lightning keeps it)."""

    def moved(path: str) -> str | None:
        relative = os.path.relpath(path, old) if path else os.pardir
        if relative.startswith(os.pardir):  # not a file of the old directory: left as it was
            return path
        candidate = os.path.join(new, relative)
        return candidate if os.path.exists(candidate) else None

    state = {**state, "dirpath": new}
    for key in ("last_model_path", "kth_best_model_path"):
        state[key] = moved(state.get(key) or "") or ""
    best = state.get("best_model_path") or ""
    state["best_model_path"] = moved(best) or best  # Lightning reloads this one even from another directory
    top = {path: score for old_path, score in (state.get("best_k_models") or {}).items() if (path := moved(old_path))}
    state["best_k_models"] = top
    if top and state["kth_best_model_path"] not in top:
        worst = max if mode == "min" else min
        state["kth_best_model_path"] = worst(top, key=top.get)
        state["kth_value"] = top[state["kth_best_model_path"]]
    return state
