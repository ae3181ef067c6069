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

A `save_top_k` (`keep_checkpoints`) lowered on a resume takes effect at once: Lightning removes a checkpoint
only as it saves one while its list holds exactly k, so a list that came back longer from the checkpoint was
never cut down. Here `on_train_start` removes the worst (for `monitor=step`, the oldest) of the recorded step
checkpoints beyond k and says which in one line. Never removed: the checkpoint the fit resumed from, `last.ckpt`,
and files outside `dirpath` (where needed to get down to k they are only no longer counted, and stay on disk);
files in the directory this callback never recorded (copies of a user's own) are not its to remove.

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
        self._keep_only_top_k(trainer)

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

    def _keep_only_top_k(self, trainer: pl.Trainer) -> None:
        """Bring the recorded step checkpoints down to `save_top_k` (a resume that lowered it), worst first."""
        k = self.save_top_k
        if k < 0 or len(self.best_k_models) <= k:
            return
        last = self.last_model_path or ""

        def kept(path: str) -> bool:  # the resumed one, last.ckpt, another directory's: never removed
            return path == last or not self._should_remove_checkpoint(trainer, path, last)

        better_first = sorted(self.best_k_models, key=lambda path: float(self.best_k_models[path]), reverse=self.mode == "max")
        removed, uncounted = [], []
        for path in sorted(reversed(better_first), key=kept):  # the worst first, those never removed last
            if len(self.best_k_models) <= k:
                break
            del self.best_k_models[path]
            if kept(path):
                uncounted.append(path)
            elif os.path.exists(path):
                self._remove_checkpoint(trainer, path)
                removed.append(path)
        worst, best = (max, min) if self.mode == "min" else (min, max)
        if self.best_k_models:
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
            self.best_model_score = self.best_k_models[self.best_model_path]
        else:
            self.kth_best_model_path, self.best_model_path, self.best_model_score = "", "", None
        if trainer.is_global_zero and (removed or uncounted):
            names = lambda paths: ", ".join(os.path.basename(path) for path in paths)
            kept_too = f"; {names(uncounted)} kept on disk, no longer counted" if uncounted else ""
            print(f"keep_checkpoints={k} (save_top_k): removed {len(removed)} step checkpoint"
                  f"{'s' * (len(removed) != 1)} beyond the {k} kept ({names(removed) or 'none'}) from {self.dirpath}"
                  f"{kept_too}", flush=True)

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
