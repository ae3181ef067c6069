"""`ProgressBar`: Lightning's RichProgressBar that reads metrics only on the steps the loggers write.

Reading the progress-bar metrics turns each logged tensor into a Python number, which makes the host wait for
the GPU. Lightning's bar does that after every batch (its `refresh_rate` throttles drawing, not reading), so on a
GPU every step ended in a host sync and the host could never queue the next step's work early. This bar keeps
the numbers it last read and reads new ones when the loggers write (every `log_every_n_steps`), at the last step
and outside training (validation shows its own metrics as usual). It also shows "Epoch 2" rather than
Lightning's "Epoch 2/-2" when the epochs are unbounded (max_steps runs set max_epochs=-1).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

from forgather.lightning.steps import writes_metrics


class ProgressBar(RichProgressBar):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, Any] | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        # The step counter is drawn by the bar itself; the metrics (and the logger's version) wait for a write.
        if self._shown is None or not trainer.training or writes_metrics(trainer):
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own (a private hook) prints max_epochs - 1 even when max_epochs is -1 (unbounded).
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            description = description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description
