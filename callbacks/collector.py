"""`GarbageCollection`: keeps Python's garbage collector from stalling a training loop that queues work ahead.

A GPU step is queued by the host ~80 ms ahead of the device (docs/benchmarks.md, "Who sets the step's pace"),
so a host pause shorter than that costs nothing, and a longer one drains the device's queue. Python's full
collection walks every tracked object: after compiling, millions (the model, the compiled graphs, the
libraries), and a 1.24B run on an H100 measured full passes of 506 and 869 ms in its timed steps. Two remedies,
both from the standard library:

- `freeze` (default on): at the end of the first training batch, when compilation and the first step's
  allocations are done, one full collection, then `gc.freeze()`: what is alive then moves to a permanent
  generation that no later collection walks, so a full pass walks only what the run made since. Serving does
  the same before it takes requests (forgather/serve/server.py). Reference counting still frees what was
  frozen; only a frozen object that later ends up in a garbage cycle waits for the fit's end. Undone
  (`gc.unfreeze()`) when the fit ends, so a process that goes on (a sweep's next run, a notebook) collects
  everything again.
- `interval` (default off): torchtitan's schedule: the collector's automatic passes off during the fit, and
  one collection of generations 0 and 1 every `interval` optimizer steps, where its pause is expected. Garbage
  in reference cycles then waits up to `interval` steps. The collector's state is restored when the fit ends,
  and on an exception.

Usable in a plain Lightning script: `Trainer(callbacks=[GarbageCollection()])`.
"""

from __future__ import annotations

import gc

import pytorch_lightning as pl


class GarbageCollection(pl.Callback):
    """Freeze what is alive after the first training batch, and optionally collect only every `interval`
    optimizer steps (the automatic collection off meanwhile). See the module's docstring."""

    def __init__(self, freeze: bool = True, interval: int | None = None) -> None:
        if not isinstance(freeze, bool) and freeze not in (0, 1):  # a string such as "false" would freeze
            raise ValueError(f"GarbageCollection(freeze=...) takes true or false (gc_freeze=false for a run); "
                             f"got {freeze!r}")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"GarbageCollection(interval=...) takes a number of optimizer steps of at least 1, or "
                             f"None to leave the collector's schedule to Python; got {interval!r}")
        self.freeze, self.interval = freeze, interval
        self._frozen = False
        self._was_enabled: bool | None = None  # the collector's state before the fit, while `interval` holds it
        self._collected_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval is not None and self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._collected_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.freeze and not self._frozen:
            gc.collect()
            gc.freeze()
            self._frozen = True
        if self.interval is not None and trainer.global_step - self._collected_step >= self.interval:
            gc.collect(1)
            self._collected_step = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        if self._was_enabled is not None:
            if self._was_enabled:
                gc.enable()
            self._was_enabled = None
