"""A wrong argument to our pieces in a plain Lightning script is one ValueError/TypeError in `__init__` that names
the argument, its value and what to give: not a NaN weight or a shape error steps later."""

import functools
import re

import pytest
import torch

from forgather.callbacks.divergence import StopOnDivergence
from forgather.callbacks.snapshot import Snapshot
from forgather.lightning.module import CausalLMModule
from forgather.loss import ChunkedLoss, NaiveLoss
from forgather.optim import Adafactor, AdamW, ApolloAdamW, GaLoreAdamW
from helpers.tiny_lm import tiny_model, toy_loader


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 4))]


@pytest.mark.parametrize("optimizer", [AdamW, GaLoreAdamW, ApolloAdamW])
@pytest.mark.parametrize("argument, value", [("lr", -1.0), ("betas", (1.0, 0.999)), ("eps", -1e-8),
                                             ("weight_decay", -0.1), ("betas", 0.9)])
def test_adam_optimizers_refuse_out_of_range_hyperparameters(optimizer, argument, value):
    with pytest.raises(ValueError, match=re.escape(f"{optimizer.__name__}({argument}={value!r}): {argument} takes")):
        optimizer(params(), **{argument: value})


@pytest.mark.parametrize("argument, value", [("weight_decay", -0.1), ("eps", 1e-3), ("eps", (-1.0, 1e-3)),
                                             ("lr", "1e-2")])
def test_adafactor_refuses_bad_arguments_in_init(argument, value):
    with pytest.raises(ValueError, match=re.escape(f"Adafactor({argument}={value!r}): {argument} takes")):
        Adafactor(params(), **{argument: value})


@pytest.mark.parametrize("chunk_size", [2.5, "64", True, 0])
def test_chunked_loss_refuses_a_chunk_size_that_is_no_token_count(chunk_size):
    with pytest.raises(ValueError, match=rf"ChunkedLoss\(chunk_size={chunk_size!r}\): chunk_size takes"):
        ChunkedLoss(chunk_size=chunk_size, compile=False)


@pytest.mark.parametrize("ignore_index", [None, "pad", -100.0])
def test_losses_refuse_an_ignore_index_that_is_no_integer(ignore_index):
    with pytest.raises(ValueError, match=rf"NaiveLoss\(ignore_index={ignore_index!r}\): ignore_index takes"):
        NaiveLoss(ignore_index=ignore_index)


def test_loss_refuses_a_negative_z_loss():
    with pytest.raises(ValueError, match=r"NaiveLoss\(z_loss=-1.0\): z_loss takes a number >= 0"):
        NaiveLoss(z_loss=-1.0)


def test_loss_refuses_float_labels():
    hidden, weight = torch.randn(2, 8, 16), torch.randn(32, 16)
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        NaiveLoss()(hidden, weight, torch.zeros(2, 8))


@pytest.mark.parametrize("schedule, arguments, message", [
    ("warmup_cosine", dict(warmup_steps=-1, total_steps=10), r"warmup_steps=-1 must be a whole number of steps, 0 or more"),
    ("warmup_cosine", dict(warmup_steps=2, total_steps=-1), r"total_steps=-1 must be .* 1 or more .*set max_steps"),
    ("warmup_cosine", dict(warmup_steps=2, total_steps=10, min_ratio=1.5), r"min_ratio=1.5 must be a number from 0 to 1"),
    ("warmup_stable_decay", dict(warmup_steps=2, total_steps=10, decay_fraction=-0.2), r"decay_fraction=-0.2 must be"),
    ("warmup_constant", dict(warmup_steps=2.5), r"warmup_steps=2.5 must be a whole number"),
])
def test_schedules_refuse_settings_without_meaning_when_lambdalr_is_built(schedule, arguments, message):
    """warmup_steps=-1 trained at the full rate from step 0 without a word; a negative min_ratio went below zero."""
    from forgather.optim import schedules

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=rf"^{schedule}: {message}"):
        torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(getattr(schedules, schedule), **arguments))


def test_module_refuses_a_built_optimizer():
    model = tiny_model()
    with pytest.raises(TypeError, match=r"optimizer=Adafactor\(\.\.\.\)\): got one already built; optimizer takes a "
                                        r"factory"):
        CausalLMModule(model, optimizer=Adafactor(model.parameters()))


@pytest.mark.parametrize("argument", ["optimizer", "lr_scheduler"])
def test_module_refuses_a_name_for_a_factory(argument):
    with pytest.raises(TypeError, match=rf"CausalLMModule\({argument}='adamw'\): got str"):
        CausalLMModule(tiny_model(), **{argument: "adamw"})


def test_module_refuses_a_loss_class_for_a_loss():
    with pytest.raises(TypeError, match="an instance, not the class"):
        CausalLMModule(tiny_model(), loss=ChunkedLoss)


def test_module_refuses_a_model_without_the_interface():
    with pytest.raises(TypeError, match="a Linear, lacks hidden_states and lm_head_weight"):
        CausalLMModule(torch.nn.Linear(4, 4))


def test_module_checks_a_factory_built_model_in_configure_model():
    module = CausalLMModule(lambda: torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="lacks hidden_states"):
        module.configure_model()


def test_module_still_takes_an_optimizer_class_and_partials():
    CausalLMModule(tiny_model(), optimizer=functools.partial(Adafactor, lr=1e-2), loss=ChunkedLoss(compile=False))


def test_snapshot_refuses_a_run_dir_that_is_a_file(tmp_path):
    file = tmp_path / "run"
    file.write_text("")
    with pytest.raises(ValueError, match="that is a file; run_dir takes a directory"):
        Snapshot(file)


def test_snapshot_without_a_run_dir_writes_into_the_trainers_log_dir(tmp_path):
    """Snapshot() was a TypeError (Path(None)); plain Lightning code has a log_dir to give it."""
    import pytorch_lightning as pl

    snapshot = Snapshot(overrides=["lr=1e-3"])
    with pytest.raises(ValueError, match=r"run_dir=None\) learns its directory from the Trainer"):
        snapshot.write()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", callbacks=[snapshot],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(CausalLMModule(tiny_model(), optimizer=functools.partial(AdamW, lr=1e-3)), toy_loader())
    assert snapshot.path == tmp_path / "lightning_logs" / "version_0" / "snapshot"
    assert (snapshot.path / "overrides.yaml").read_text() == "- lr=1e-3\n"
    with pytest.raises(ValueError, match=r"run_dir takes a directory's path"):
        Snapshot(run_dir=3)


def test_snapshot_refuses_sources_that_are_no_mapping(tmp_path):
    with pytest.raises(ValueError, match=r"sources takes a mapping"):
        Snapshot(tmp_path, sources=["train.py"])


def test_stop_on_divergence_refuses_one_metric_name_as_a_string():
    with pytest.raises(ValueError, match=r"metrics takes a tuple of metric names, e.g. \('train/loss',\)"):
        StopOnDivergence(metrics="train/loss")


def test_export_model_refuses_no_model_config_when_built(tmp_path):
    """It failed only when training ended, with nothing exported."""
    from forgather.callbacks.model_export import ExportModel

    with pytest.raises(TypeError, match=r"^ExportModel\(model_config=None\): give the model's config tree"):
        ExportModel(tmp_path / "out", "m", model_config=None)
