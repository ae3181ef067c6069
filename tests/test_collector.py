"""forgather.callbacks.collector.GarbageCollection in a plain Lightning fit on the CPU: what is alive after the first
batch is frozen out of the collector's sight until the fit ends; with `interval`, the automatic collection is off
during the fit and generations 0-1 are collected every `interval` steps; the collector's state comes back after
the fit and after an exception."""

from __future__ import annotations

import gc

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from forgather.callbacks.collector import GarbageCollection


class Watched(BoringModel):
    """Records, at each batch's start, how many objects are frozen and whether the collector runs by itself."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.seen: list[tuple[int, bool]] = []
        self.fail_at = fail_at

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append((gc.get_freeze_count(), gc.isenabled()))
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("a failing step")


def fit(module: pl.LightningModule, callback: GarbageCollection, steps: int = 5) -> None:
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module)


@pytest.fixture(autouse=True)
def collector_state():
    """Each test starts and ends with the collector on and nothing frozen (it is the process's state)."""
    gc.unfreeze()
    gc.enable()
    yield
    assert gc.isenabled() and gc.get_freeze_count() == 0, "the fit left the collector changed"


def test_what_is_alive_after_the_first_batch_is_frozen_until_the_fit_ends():
    module = Watched()
    fit(module, GarbageCollection())
    frozen = [count for count, _ in module.seen]
    assert frozen[0] == 0 and all(count > 1000 for count in frozen[1:]), frozen  # the modules, torch, Lightning
    assert all(enabled for _, enabled in module.seen)  # the automatic collection still runs


def test_with_an_interval_the_collector_runs_only_every_interval_steps(monkeypatch):
    collections = []
    real_collect = gc.collect

    def collect(generation=2):
        collections.append((module.global_step, generation))
        return real_collect(generation)

    monkeypatch.setattr(gc, "collect", collect)
    module = Watched()
    fit(module, GarbageCollection(freeze=False, interval=2), steps=7)
    assert [enabled for _, enabled in module.seen] == [False] * 7
    assert [count for count, _ in module.seen] == [0] * 7
    assert collections == [(2, 1), (4, 1), (6, 1)]


def test_an_exception_gives_the_collector_back():
    with pytest.raises(RuntimeError, match="a failing step"):
        fit(Watched(fail_at=3), GarbageCollection(interval=10))
    # collector_state checks that it is on again and nothing is frozen


@pytest.mark.parametrize("interval", [0, -1, 2.5, True, "10"])
def test_an_interval_that_is_not_a_number_of_steps_is_refused(interval):
    with pytest.raises(ValueError, match="number of optimizer steps of at least 1"):
        GarbageCollection(interval=interval)


def test_the_collector_bench_measures_a_full_pass_before_and_after_the_freeze():
    """scripts/bench_collector.py on a short uncompiled run: after the freeze a full pass walks (almost) nothing."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_collector.py"
    run = subprocess.run([sys.executable, str(script), "compile=false", "max_steps=2"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    match = re.search(r"full collection: ([\d.]+) ms over ([\d,]+) tracked objects before the freeze, ([\d.]+) ms "
                      r"after it \(([\d,]+) frozen\)", run.stdout)
    assert match, run.stdout[-2000:]
    before, after, frozen = float(match[1]), float(match[3]), int(match[4].replace(",", ""))
    assert frozen > 100_000 and after < before / 5


@pytest.mark.parametrize("freeze", ["false", None])
def test_a_freeze_that_is_not_true_or_false_is_refused(freeze):
    with pytest.raises(ValueError, match=r"GarbageCollection\(freeze=...\) takes true or false"):
        GarbageCollection(freeze=freeze)
