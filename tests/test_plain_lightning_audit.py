"""Forgather's Lightning parts in plain Lightning scripts, in configurations an experienced user reaches for:
a trainer used again after fit, gradient accumulation, max_epochs runs, a subclass with its own training_step,
trainer.predict. Each test is a few steps of the tiny model on the CPU."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers.logger import Logger

from forgather.lightning.module import TRAIN_METRICS, CausalLMModule
from helpers.tiny_lm import BATCH, SEQ, VOCAB, tiny_model, toy_loader


class Recorder(Logger):
    """Every `log_metrics` call, as (step, metrics)."""

    name, version = "recorder", 0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def training_rows(self) -> list[tuple[int, dict[str, float]]]:
        return [(step, metrics) for step, metrics in self.calls if "train/loss" in metrics]


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    torch.set_num_threads(1)
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**settings, **kwargs})


def module() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(tiny_model())


def test_using_the_trainer_again_after_fit_prints_no_callback_override_notice(tmp_path, caplog):
    trainer, model = make_trainer(tmp_path, max_steps=2), module()
    trainer.fit(model, toy_loader(2))
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        trainer.validate(model, toy_loader(1), verbose=False)
        trainer.fit_loop.epoch_loop.max_steps = 4
        trainer.fit(model, toy_loader(2))
    assert trainer.global_step == 4
    assert not [record.message for record in caplog.records if "configure_callbacks" in record.getMessage()]


def test_accumulated_batches_write_one_whole_row_per_written_optimizer_step(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2, logger=recorder)
    trainer.fit(module(), toy_loader(8))
    rows = recorder.training_rows()
    # optimizer steps 2 and 4 (0-based 1 and 3); no row for the first batch of the first window, which steps nothing
    assert [step for step, _ in rows] == [1, 3]
    assert all(set(TRAIN_METRICS) <= set(metrics) for _, metrics in rows)


def test_a_max_epochs_run_writes_its_last_steps_metrics_when_log_every_n_steps_is_larger(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, log_every_n_steps=50, logger=recorder)
    trainer.fit(module(), toy_loader(4))
    rows = recorder.training_rows()
    assert [step for step, _ in rows] == [5]  # the last of 2 x 3 optimizer steps: the run's final numbers
    assert set(TRAIN_METRICS) <= set(rows[0][1])
    assert set(TRAIN_METRICS) <= set(trainer.callback_metrics)


class OwnStep(CausalLMModule):
    """A user's subclass: its own training_step (no super()) and its own optimizer."""

    def training_step(self, batch, batch_idx):
        hidden = self.model.hidden_states(batch["input_ids"], position_ids=batch["position_ids"])
        loss = self.loss(hidden, self.model.lm_head_weight, batch["labels"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_subclass_with_its_own_training_step_trains_and_is_measured(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=3, log_every_n_steps=1)
    trainer.fit(OwnStep(tiny_model()), toy_loader(3))
    assert trainer.global_step == 3
    assert float(trainer.callback_metrics["train/tokens_per_s"]) > 0
    assert "train/grad_norm" in trainer.callback_metrics


def test_predict_gives_the_logits_of_each_batch(tmp_path):
    model = module()
    predictions = make_trainer(tmp_path).predict(model, toy_loader(2))
    assert [tuple(logits.shape) for logits in predictions] == [(BATCH, SEQ, VOCAB)] * 2
    batch = next(iter(toy_loader(1)))
    with torch.no_grad():
        assert torch.allclose(predictions[0], model(batch["input_ids"], position_ids=batch["position_ids"]))


def test_the_progress_bar_ends_on_the_last_steps_loss(tmp_path):
    from forgather.lightning.progress import ProgressBar

    class Shown(ProgressBar):
        def get_metrics(self, trainer, pl_module):
            self.last_shown = dict(super().get_metrics(trainer, pl_module))
            return self.last_shown

    bar = Shown()
    trainer = make_trainer(tmp_path, max_steps=3, log_every_n_steps=50, enable_progress_bar=True, callbacks=[bar])
    trainer.fit(module(), toy_loader(3))
    assert bar.last_shown["train/loss"] == float(trainer.callback_metrics["train/loss"])


class TupleBatches(OwnStep):
    """A user's subclass whose loader gives (input_ids, labels) tuples."""

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.loss(self.model.hidden_states(input_ids), self.model.lm_head_weight, labels)


def test_a_subclass_with_batches_of_its_own_format_trains_without_a_token_count(tmp_path):
    torch.manual_seed(0)
    sample = next(iter(toy_loader(1)))
    loader = torch.utils.data.DataLoader([(sample["input_ids"], sample["labels"])] * 3, batch_size=None)
    trainer = make_trainer(tmp_path, max_steps=3, log_every_n_steps=1)
    trainer.fit(TupleBatches(tiny_model()), loader)
    assert trainer.global_step == 3
    assert "train/grad_norm" in trainer.callback_metrics and "train/tokens_per_s" not in trainer.callback_metrics


class PoisonAfterStep(pl.Callback):
    """Turns the head's weights NaN after optimizer step `step`, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head_weight.fill_(float("nan"))


def test_stop_on_divergence_refuses_to_end_a_run_whose_last_weights_are_nan(tmp_path):
    import pytest

    from forgather.callbacks.divergence import StopOnDivergence, TrainingDiverged

    # No checkpoint and no written step between the divergence and the end: only the end can tell.
    trainer = make_trainer(tmp_path, max_steps=4, log_every_n_steps=50,
                           callbacks=[PoisonAfterStep(2), StopOnDivergence()])
    with pytest.raises(TrainingDiverged, match=r"training diverged by step 4: model\.\S+ holds NaN or inf"):
        trainer.fit(module(), toy_loader(4))


def test_a_module_fit_again_by_a_new_trainer_writes_every_logged_step(tmp_path):
    model = module()
    make_trainer(tmp_path, max_steps=3, log_every_n_steps=3, logger=Recorder()).fit(model, toy_loader(3))
    recorder = Recorder()  # e.g. pretraining, then fine-tuning the same module with a trainer of its own
    make_trainer(tmp_path, max_steps=6, log_every_n_steps=3, logger=recorder).fit(model, toy_loader(6))
    assert [step for step, _ in recorder.training_rows()] == [2, 5]


def test_the_step_after_a_validation_has_its_throughput(tmp_path):
    """The window reopened at the end of the first batch after validation, so with log_every_n_steps=1 that
    step's row had no train/tokens_per_s."""
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=6, log_every_n_steps=1, val_check_interval=2, limit_val_batches=1,
                           logger=recorder)
    trainer.fit(module(), toy_loader(6), toy_loader(1))
    rows = dict(recorder.training_rows())
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]  # Lightning's 0-based steps of optimizer steps 1..6
    assert [step for step, metrics in rows.items() if "train/tokens_per_s" not in metrics] == [0]


def test_the_lr_finder_sets_the_rate_the_next_fit_trains_with(tmp_path):
    # Tuner.lr_find (update_attr=True by default) looks for `lr` or `learning_rate` on the module: it found neither
    # and stopped with an AttributeError; now its suggestion is the base rate of the next fit's optimizer.
    from pytorch_lightning.tuner import Tuner

    trainer, model = make_trainer(tmp_path, max_steps=2), module()
    finder = Tuner(trainer).lr_find(model, train_dataloaders=toy_loader(30), num_training=30, min_lr=1e-5, max_lr=1e-1,
                                    early_stop_threshold=None)
    assert model.lr is not None and model.lr == finder.suggestion()
    trainer.fit(model, toy_loader(2))
    assert trainer.optimizers[0].param_groups[0]["lr"] == model.lr


def test_a_module_rate_replaces_the_optimizer_factorys_and_one_the_optimizer_cannot_take_is_one_line(tmp_path):
    import functools

    import pytest

    from forgather.errors import UserError

    model = CausalLMModule(tiny_model(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), lr=3e-4)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(model, toy_loader(1))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 3e-4
    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    with pytest.raises(UserError, match="lr=0.01: the optimizer factory sgd takes no lr"):
        CausalLMModule(tiny_model(), optimizer=sgd, lr=1e-2).configure_optimizers()
