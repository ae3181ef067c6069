"""A run's bookkeeping under a resume: metrics.csv keeps one row per logged step of the trajectory the run
followed, whatever the resumed process logs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor

from forgather.lightning.csv_logger import CSVLogger
from forgather.lightning.model_checkpoint import ModelCheckpoint
from forgather.lightning.module import CausalLMModule
from helpers.tiny_lm import tiny_model, toy_loader


def fit(run_dir: Path, log_every_n_steps: int, ckpt_path: str | None = None) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, log_every_n_steps=log_every_n_steps, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=4, save_top_k=-1)],
        logger=CSVLogger(run_dir, name="csv", version=""), enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(8), ckpt_path=ckpt_path)


def loss_rows(run_dir: Path) -> list[tuple[int, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [(int(row["step"]), row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]


def test_a_resume_logging_other_steps_drops_the_rows_past_its_checkpoint(tmp_path):
    fit(tmp_path, log_every_n_steps=1)
    first = loss_rows(tmp_path)
    # resumed from step 4 (say with another learning rate) logging every 3rd step: rows for steps 5 and 7 (0-based)
    fit(tmp_path, log_every_n_steps=3, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"))
    resumed = loss_rows(tmp_path)
    assert resumed[:4] == [row for row in first if row[0] < 4]
    assert [step for step, _ in resumed[4:]] == [5, 7], "the first run's row of step 4 is not of this trajectory"


def test_a_checkpoint_steps_row_stays_one_row_when_another_logger_row_comes_first(tmp_path):
    seen_at_batch_end: list[list[tuple[int, str]]] = []

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # after the learning-rate monitor's row of this batch, before the step-1 loss row
                seen_at_batch_end.append(loss_rows(tmp_path))

    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, log_every_n_steps=1, num_sanity_val_steps=0,
        callbacks=[LearningRateMonitor(), Snapshot(),
                   ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)],
        logger=CSVLogger(tmp_path, name="csv", version=""), enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(4))
    assert [step for step, _ in seen_at_batch_end[0]] == [0, 1], "the checkpoint step's row is on disk meanwhile"
    assert [step for step, _ in loss_rows(tmp_path)] == [0, 1, 2, 3], "one loss row a step"


def test_a_model_whose_layers_attribute_is_a_count_is_not_estimated_and_trains():
    from torch import nn

    from forgather.lightning.memory import activation_bytes, check_batch_fits

    model = nn.Linear(2, 2)
    model.hidden_size, model.vocab_size, model.layers = 8, 16, 4  # plain model code: `layers` the number of layers
    assert activation_bytes(model, rows=2, tokens=8, bytes_per_value=4, training=True) is None
    check_batch_fits(model, torch.Size([2, 8]), torch.device("cpu"), 4, training=True)
    model.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    assert activation_bytes(model, rows=2, tokens=8, bytes_per_value=4, training=True) > 0  # a list of layers: estimated


def test_a_provisional_row_still_waiting_is_kept_when_the_next_checkpoint_writes_its_own(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.experiment.write_provisional({"train/loss": 4.0}, 1)
    logger.log_metrics({"lr": 0.1}, step=2)  # another group's row of the next step: row 1 keeps waiting
    logger.save()
    logger.experiment.write_provisional({"train/loss": 3.0}, 2)
    logger.log_metrics({"train/loss": 3.0, "train/tokens_per_s": 9.0}, step=2)  # replaces the step-2 one
    logger.save()
    assert loss_rows(tmp_path) == [(1, "4.0"), (2, "3.0")]
