"""Which optimizer steps the loggers write: the one rule the module, the progress bar and job control share.

Between those steps nothing of ours reads a metric tensor, so the host never waits for the GPU there.
"""

from __future__ import annotations

import pytorch_lightning as pl


def writes_metrics(trainer: pl.Trainer, step: int | None = None) -> bool:
    """Whether the loggers write the metrics of optimizer step `step` (1-based; default: the step just taken):
    every `log_every_n_steps`-th, and the last one (the run's final numbers)."""
    step = trainer.global_step if step is None else step
    last = 0 < trainer.max_steps <= step or trainer.should_stop
    return last or step % max(1, trainer.log_every_n_steps) == 0
