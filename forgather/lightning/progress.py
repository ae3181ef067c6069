"""`ProgressBar`: Lightning's RichProgressBar that reads metrics only on the steps the loggers write.

Reading the progress-bar metrics turns each logged tensor into a Python number, which makes the host wait for
the GPU. Lightning does that after every batch for every metric logged with `prog_bar=True` (its logger
connector, whatever bar is drawn; `refresh_rate` throttles drawing, not reading), so on a GPU every step ended
in a host sync and the host could never queue the next step's work early. So the training loss is not logged
as a progress-bar metric; this bar shows it (TRAIN_METRICS) as the loggers got it: from forgather's module, the
numbers its DeferredMetrics wrote last (a step after the step they belong to, read without a wait; the last
step's written when training ends, before the bar's last update); from any
other module, the callback metrics when the loggers write (every `log_every_n_steps`) and at the last step. It
keeps the numbers it last read in between. Outside
training it shows the progress-bar metrics as usual (validation's loss) beside the last training loss. It also
shows "Epoch 2" rather than Lightning's "Epoch 2/-2" when the epochs are unbounded (max_steps runs set
max_epochs=-1).

Three more departures from Lightning's bar:
- the total of a max_steps run counts the batches already done in the epoch: after a mid-epoch resume the
  bar (which counts the epoch's batches) showed `200/99`; gradient accumulation is counted too;
- no `v_num` (the logger's version number, noise in the bar; the run directory names the run);
- Lightning's own log lines ("`Trainer.fit` stopped: ...") are written through Rich while the bar is drawn, so
  they land on a line of their own above it instead of glued to its end.
Constructing the bar also applies `quiet_lightning()` (forgather.lightning.quiet).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

from forgather.lightning.quiet import quiet_lightning
from forgather.lightning.steps import DeferredMetrics, writes_metrics

# Training metrics the bar shows, read where the loggers write them. They are not `prog_bar` metrics: Lightning
# turns those into numbers after every batch, which made every step wait for the GPU.
TRAIN_METRICS = ("train/loss",)

# The loggers Lightning gives a stderr handler of its own when the application configured none.
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time: Rich's proxy while the bar is live, which prints above
    the bar. (Lightning's handler holds the stderr of import time, which writes into the bar's line.)"""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class ProgressBar(RichProgressBar):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, Any] | None = None
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        quiet_lightning()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._redirected:
            return
        for name in _LIGHTNING_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
                    self._redirected.append((handler, handler.setStream(_CurrentStderr())))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # forgather's module writes the last step's numbers in its own on_train_end, after this hook: written here
        # first (that step is done, no wait), so the bar ends on the run's final loss, not the one written before
        deferred = getattr(pl_module, "deferred_metrics", None)
        if isinstance(deferred, DeferredMetrics):
            deferred.flush(trainer)
            self._update_metrics(trainer, pl_module)
            self.refresh()
        super().on_train_end(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs != -1 or trainer.max_steps is None or trainer.max_steps <= 0:
            return super().total_train_batches
        # The bar counts batch_idx + 1, which goes on from where a mid-epoch resume restored it.
        loop = trainer.fit_loop.epoch_loop
        done = loop.batch_progress.current.ready if loop.restarting else 0
        left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
        return min(trainer.num_training_batches, done + left)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        # The step counter is drawn by the bar itself; the metrics wait for a write.
        deferred = getattr(pl_module, "deferred_metrics", None)
        written = deferred.last if isinstance(deferred, DeferredMetrics) else None
        if self._shown is None or not trainer.training or writes_metrics(trainer):
            shown = super().get_metrics(trainer, pl_module)
            shown.pop("v_num", None)
            for key in TRAIN_METRICS:
                value = trainer.callback_metrics.get(key) if trainer.training and written is None else None
                if value is not None:
                    shown[key] = float(value)
                elif self._shown and key in self._shown:  # validation: the last training value stays in view
                    shown[key] = self._shown[key]
            self._shown = shown
        if written:
            # forgather's module: the numbers its loggers got last, a step after the step they belong to (host
            # numbers, no wait), shown as they arrive
            self._shown.update({key: written[key] for key in TRAIN_METRICS if key in written})
        return self._shown

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own (a private hook) prints max_epochs - 1 even when max_epochs is -1 (unbounded).
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description
