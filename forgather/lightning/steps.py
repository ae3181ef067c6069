"""Which optimizer steps the loggers write (the one rule the module, the progress bar and job control share), and
how their metrics reach the loggers without the host waiting for the GPU (`DeferredMetrics`).

Between those steps nothing of ours reads a metric tensor; on them, the numbers are read a step later.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


def writes_metrics(trainer: pl.Trainer, step: int | None = None) -> bool:
    """Whether the loggers write the metrics of optimizer step `step` (1-based; default: the step just taken):
    every `log_every_n_steps`-th, and the last one (the run's final numbers: max_steps reached, a stop, or the
    last batch of max_epochs). Step 0 is none: the batches before it accumulate gradients for step 1."""
    step = trainer.global_step if step is None else step
    if step < 1:
        return False
    last = 0 < trainer.max_steps <= step or trainer.should_stop or ends_last_epoch(trainer)
    return last or step % max(1, trainer.log_every_n_steps) == 0


def ends_last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is the last one of the fit's last epoch (`max_epochs`); known from
    the batch's start (Lightning's loader fetches a batch ahead)."""
    max_epochs = trainer.fit_loop.max_epochs
    last_epoch = max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1
    return last_epoch and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class DeferredMetrics:
    """A logged step's training metrics, handed to the loggers one step later, so that no step waits for the GPU.

    Lightning's logger connector turns each logged tensor into a number at the step that logs it (`.item()`):
    the host waits there until the GPU has run every kernel queued so far, then does the step's host work and
    launches the next step's kernels while the GPU, its queue empty, idles (on an H200 ~1.2 ms a step on average
    at the 1.24B shape, logging every 5 steps). The module logs its training metrics with `logger=False`
    instead (callbacks that monitor them, early stopping or checkpointing on `train/loss`, still see them) and,
    at each step the loggers write (`writes_metrics`), `capture` copies them into pinned host memory without
    waiting and records an event. The next `flush` (the next batch's end, when validation starts, before a
    checkpoint, at the end of training) waits for that event, done long before by then, and writes the numbers
    to every logger with the step and epoch they belong to, as Lightning would have written them.

    Written here rather than with a Lightning option: Lightning has none to log asynchronously.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.last: dict[str, float] = {}  # the numbers written last, for the progress bar
        self._pending: tuple[int, int, dict[str, torch.Tensor], torch.cuda.Event | None] | None = None
        self._captured_step = -1
        self._logged: set[str] = set()  # names logged since the last capture

    def logged(self, name: str) -> None:
        """`name` was logged on this step (`callback_metrics` keeps a value of an earlier step, which is not
        written again)."""
        self._logged.add(name)

    def capture(self, trainer: pl.Trainer) -> None:
        """Start copying this step's metrics to the host, if the loggers write this step (once a step: batches
        that accumulate gradients for the next step leave it alone)."""
        if trainer.global_step == self._captured_step or not writes_metrics(trainer):
            return
        self.flush(trainer)
        self._captured_step = trainer.global_step
        copies, event = {}, None
        names, self._logged = self._logged, set()
        for name in self.names:
            value = trainer.callback_metrics.get(name) if name in names else None
            if value is None:
                continue
            value = value.detach()
            if value.is_cuda:
                copy = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                copies[name] = copy.copy_(value, non_blocking=True)
                event = torch.cuda.Event()
            else:  # a host tensor already (or a device whose copies wait anyway): its value, kept
                copies[name] = value.clone()
        if event is not None:
            event.record()
        self._pending = (_logged_step(trainer), trainer.current_epoch, copies, event)

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the captured metrics, if any, to the loggers."""
        if self._pending is None:
            return
        step, epoch, copies, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self.last = {}
        for name, value in copies.items():  # host copies: no wait (a loop, so the reads sit in this frame)
            self.last[name] = value.item()
        if self.last:
            for logger in trainer.loggers:
                logger.log_metrics({**self.last, "epoch": epoch}, step=step)
                logger.save()

    def now(self, trainer: pl.Trainer) -> dict[str, float]:
        """This step's metrics as numbers, read now (a host wait: for a step about to be checkpointed, whose
        saving waits for the GPU anyway)."""
        values = {name: trainer.callback_metrics.get(name) for name in self.names if name in self._logged}
        return {name: float(value) for name, value in values.items() if value is not None}


def _logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives a training step's row (its count of batches that stepped the
    optimizer, which it keeps in the fit loop), so that training and validation rows share one axis."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped
