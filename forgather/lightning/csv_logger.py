"""`CSVLogger`: Lightning's CSV logger, keeping a run's history across resumes.

Lightning's `CSVLogger` deletes an existing `metrics.csv` when it starts, so a resumed run loses every row
logged before the resume. This one keeps the file: at its first write, the rows of the steps this process
logs again (steps at or after the first step it logs, which a resume from a checkpoint re-runs) are
dropped, and the new rows are appended. Any number of resumes leaves one row per logged step and metric
group, as an uninterrupted run would; a fresh run in an empty directory starts a fresh file as before; a
process that logs nothing (resuming a finished run) leaves the file as it was.

The steps Lightning logs are global steps, so after a resume from a checkpoint at step N the first rows
carry step N, and the rows of step N on are dropped even where this process logs none of those steps
(`forgather.lightning.model_checkpoint.ModelCheckpoint` tells the logger N, `resume_at`): rows before it (including a validation that ran after that checkpoint was saved, logged at
step N-1, which Lightning does not re-run) are kept. Every rewrite of the file is atomic.

A training step's row is written after the `on_train_batch_end` hooks, where step checkpoints are saved
(Lightning's logger connector right after them; forgather's module writes its training metrics at the next
batch's end, forgather.lightning.steps.DeferredMetrics), so a process killed while it writes a checkpoint
would lose the row of the step the checkpoint holds. `forgather.lightning.model_checkpoint.ModelCheckpoint`
calls `log_step_before_checkpoint` first; the row logged for that step afterwards replaces it (with the
metrics the module's `on_train_batch_end` adds, the throughput). The replacement is one atomic rename of a rewritten copy: dropping
the provisional line in place and then appending would lose the step's row to a kill between the two. Rows of
other groups logged in between (a learning-rate monitor's at the next batch's start) are written before the
provisional row, which stays last until rows of its step hold every number it holds.
Usable in plain Lightning code as a drop-in for `pytorch_lightning.loggers.CSVLogger`.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from lightning_fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning_fabric.utilities.logger import _add_prefix
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from forgather.data.cache import atomic_write


_TAIL = 1 << 16  # more than one row of metrics.csv


def _whole(row: dict[Any, Any]) -> bool:
    """Whether a csv.DictReader row has exactly the header's fields and a step (a kill mid-write cuts one)."""
    return None not in row and None not in row.values() and str(row.get("step", "")).isdigit()


def _drop_last_line(path: Path) -> None:
    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        start = max(0, size - _TAIL)
        file.seek(start)
        tail = file.read()
        file.truncate(start + tail.rfind(b"\n", 0, len(tail) - 1) + 1)


class _HistoryKeepingWriter(ExperimentWriter):
    """Lightning's experiment writer, appending to an existing metrics.csv instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._history_trimmed = False
        self._resumed_step: int | None = None
        self._provisional: dict[str, Any] | None = None  # the last line of the file, while it stands in
        self._unreplaced: set[str] = set()  # its columns the rows logged for its step since have not had
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; the history is kept (trimmed at the first save)."""

    def resume_at(self, step: int) -> None:
        """Rows from `step` on belong to steps this process trains again: drop them at the first save too."""
        self._resumed_step = step

    def write_provisional(self, metrics: dict[str, float], step: int) -> None:
        """Write a row now that the next row logged for the same step replaces (the last line of the file)."""
        self.save()
        if self._provisional is not None and self._provisional["step"] != step:
            self._provisional = None  # an earlier step's, still waiting, stays a row of its own: this one is last
        self.log_metrics(metrics, step)
        row = dict(self.metrics[-1])
        self.save()
        self._provisional, self._unreplaced = row, set(row)

    def save(self) -> None:
        if not self.metrics:
            return
        if not self._history_trimmed:
            self._history_trimmed = True
            first = min(int(row["step"]) for row in self.metrics)
            self._keep_rows_before(first if self._resumed_step is None else min(first, self._resumed_step))
        provisional, self._provisional = self._provisional, None
        if provisional is None or not os.path.isfile(self.metrics_file_path):
            super().save()
            return
        # Rows of other groups (a learning-rate monitor's, validation's) can come between the provisional row and
        # the rows that replace it: they go before it, and it stays the last line until every number it holds
        # is in a row of its step. Its step's rows come by the end of the next step; a later row ends the wait.
        step = provisional["step"]
        self._unreplaced -= set().union(*(row for row in self.metrics if row["step"] == step))
        if not self._unreplaced:
            atomic_write(Path(self.metrics_file_path), self._save_replacing_last_line)
        elif all(row["step"] <= step + 1 for row in self.metrics):
            self.metrics.append(provisional)
            atomic_write(Path(self.metrics_file_path), self._save_replacing_last_line)
            self._provisional = provisional
        else:  # its replacement never came whole: the row stays
            super().save()

    def _save_replacing_last_line(self, copy: Path) -> None:
        """Lightning's save into `copy`, a copy of metrics.csv without its last line (the provisional row)."""
        final = self.metrics_file_path
        shutil.copyfile(final, copy)
        _drop_last_line(copy)
        self.metrics_file_path = str(copy)
        try:
            super().save()
        finally:
            self.metrics_file_path = final

    def _keep_rows_before(self, first_step: int) -> None:
        """Drop the rows this process is about to log again; adopt the file's columns."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [row for row in rows if _whole(row) and int(row["step"]) < first_step]
        if not kept:
            os.remove(self.metrics_file_path)
            return
        self.metrics_keys = sorted(columns)
        self._write_rows(self.metrics_keys, kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._write_rows(fieldnames, rows)

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, lambda path: path.write_text(text.getvalue(), newline=""))


class CSVLogger(LightningCSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` (same arguments) whose metrics.csv survives a resume."""

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """This fit trains again from logged step `step` (a resume): the rows an earlier process logged from
        there on are dropped at the first write, also those of steps this fit logs no row for (a resume with
        another `log_every_n_steps`, or after a stop between logged steps)."""
        self.experiment.resume_at(step)

    @rank_zero_only
    def log_step_before_checkpoint(self, trainer: pl.Trainer, deferred: dict[str, float] | None = None) -> None:
        """Write now the row logged for this training step after the `on_train_batch_end` hooks: Lightning's
        (metrics logged for the loggers) and `deferred`, the module's metrics that it writes a step later."""
        connector = trainer._logger_connector
        if trainer.fit_loop._should_accumulate():
            return
        metrics = convert_tensors_to_scalars(connector.metrics["log"]) if connector.should_update_logs else {}
        metrics.update(deferred or {})
        if metrics:
            metrics.setdefault("epoch", trainer.current_epoch)  # as Lightning's logger connector adds it
            metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
            self.experiment.write_provisional(metrics, trainer.fit_loop.epoch_loop._batches_that_stepped)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryKeepingWriter(log_dir=self.log_dir)
        return self._experiment
