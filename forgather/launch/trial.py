"""`ReportToTrial`: a Lightning callback that reports a point's validation metric to its Optuna trial after
every validation, and stops training when the study's pruner says the trial is worse than the others were at
that step. Runs in the point's process against the study's shared storage (SQLite in the sweep directory);
the pruner is rebuilt here from the same settings, since a study's storage does not keep it."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class ReportToTrial(pl.Callback):
    def __init__(self, storage: str, study: str, trial_id: int, metric: str, pruner: dict[str, Any]) -> None:
        from forgather.launch.optuna import load_study

        self.trial = None
        self.metric = metric
        self.reported: dict[int, float] = {}
        self.pruned = False
        self._open = lambda: load_study(storage, study, pruner)
        self.trial_id = trial_id

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        value = trainer.callback_metrics.get(self.metric)
        if trainer.is_global_zero and value is not None:
            import optuna

            if self.trial is None:
                self.trial = optuna.trial.Trial(self._open(), self.trial_id)
                # A trial that continues an interrupted one's checkpoint holds its values from before it.
                self.reported = dict(self.trial.storage.get_trial(self.trial_id).intermediate_values)
            if trainer.global_step not in self.reported:
                self.reported[trainer.global_step] = float(value)
                self.trial.report(float(value), trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned = True
            trainer.should_stop = True
