"""The module's training metrics reach the loggers a step late (forgather.lightning.steps.DeferredMetrics), so that
no step waits for the GPU, yet every row carries its own step, none is lost to a failure or a checkpoint, and
monitors see the values on their own step.

On the CPU the copies are plain clones; the pinned copies and their events are checked on a GPU
(tests/gpu/test_run_gpu.py: the runner's steps under torch.cuda.set_sync_debug_mode("error")).
"""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint as LightningModelCheckpoint
from pytorch_lightning.loggers.logger import Logger

from forgather.lightning.csv_logger import CSVLogger
from forgather.lightning.model_checkpoint import ModelCheckpoint
from forgather.lightning.module import CausalLMModule
from helpers.tiny_lm import tiny_model, toy_loader


class Recorder(Logger):
    """Every `log_metrics` call: (the step it is for, the trainer's global step when it came, the metrics)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, dict[str, float]]] = []
        self.trainer: pl.Trainer | None = None

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, self.trainer.global_step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(tmp_path, max_steps, log_every_n_steps, callbacks=(), loggers=None, batches=None, recorder=None):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    recorder = recorder or Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, log_every_n_steps=log_every_n_steps,
        logger=[recorder, *(loggers or [])], callbacks=list(callbacks), enable_checkpointing=any(
            isinstance(c, LightningModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    recorder.trainer = trainer
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(batches or max_steps))
    return trainer, recorder


def training_rows(recorder):
    return [(step, now, metrics) for step, now, metrics in recorder.calls if "train/loss" in metrics]


def test_a_written_step_reaches_the_loggers_at_the_next_batch_with_its_own_step_and_epoch(tmp_path):
    trainer, recorder = fit(tmp_path, max_steps=5, log_every_n_steps=2)
    rows = training_rows(recorder)
    # steps 2 and 4 (0-based 1 and 3) arrive at the end of batches 3 and 5; the last step (5) at the end of fit
    assert [(step, now) for step, now, _ in rows] == [(1, 3), (3, 5), (4, 5)]
    assert all(metrics["epoch"] == 0 for _, _, metrics in rows)
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(rows[0][2])
    # the numbers are those of their own step: the last row is the loss the callbacks saw at the end
    assert rows[-1][2]["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))


def test_monitors_see_the_loss_on_its_own_step(tmp_path):
    seen = []

    class Monitor(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, float(trainer.callback_metrics["train/loss"]), float(outputs["loss"])))

    fit(tmp_path, max_steps=3, log_every_n_steps=5, callbacks=[Monitor()])
    assert [step for step, _, _ in seen] == [1, 2, 3]
    assert all(logged == pytest.approx(loss) for _, logged, loss in seen)


def test_a_failed_step_keeps_the_row_of_the_written_step_before_it(tmp_path):
    class Fail(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # step 2 was written; its row is still on its way
                raise RuntimeError("boom")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, max_steps=6, log_every_n_steps=2, callbacks=[Fail()], recorder=recorder)
    # written by the module's callback when fit failed, before the next batch's end that would have written it
    assert [(step, now) for step, now, _ in training_rows(recorder)] == [(1, 2)]


def read_csv(root):
    (path,) = root.rglob("metrics.csv")
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_checkpoint_step_has_its_row_on_disk_before_the_checkpoint_and_one_row_after(tmp_path, monkeypatch):
    on_disk = []
    original = LightningModelCheckpoint._save_checkpoint

    def save(self, trainer, filepath):
        on_disk.append((trainer.global_step, [(row["step"], row.get("train/loss", ""), row.get("train/tokens_per_s", ""))
                                              for row in read_csv(tmp_path / "csv")]))
        original(self, trainer, filepath)

    monkeypatch.setattr(LightningModelCheckpoint, "_save_checkpoint", save)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(tmp_path, max_steps=4, log_every_n_steps=2, callbacks=[checkpoint], loggers=[CSVLogger(tmp_path / "csv")],
        batches=4)
    # the step-2 checkpoint (0-based step 1): its row with the loss is on disk first (throughput comes later)
    step, rows = on_disk[0]
    assert step == 2 and [(s, bool(loss)) for s, loss, _ in rows] == [("1", True)]
    final = [(row["step"], bool(row["train/loss"]), bool(row["train/tokens_per_s"])) for row in read_csv(tmp_path / "csv")
             if row.get("train/loss")]
    # one row a written step, the provisional one replaced by the whole row
    assert final == [("1", True, True), ("3", True, True)]
