"""CausalLMModule on CPU: training, logging to TensorBoard, late model construction, optimizer factories."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from forgather.lightning.module import CausalLMModule
from forgather.models.causal_lm import CausalLM
from helpers.tiny_lm import BATCH, SEQ, VOCAB, tiny_model, toy_loader

def make_trainer(tmp_path, max_steps: int, log_every_n_steps: int = 1, **kwargs) -> pl.Trainer:
    torch.set_num_threads(1)
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def scalars(trainer: pl.Trainer) -> dict[str, list[float]]:
    """Every scalar the TensorBoard logger wrote, read back from its event file."""
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_decreases_on_a_learnable_batch(tmp_path) -> None:
    torch.manual_seed(0)
    recorder = LossRecorder()
    module = CausalLMModule(tiny_model(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    make_trainer(tmp_path, max_steps=30, callbacks=[recorder]).fit(module, toy_loader(30))
    assert recorder.losses[-1] < 0.5 * recorder.losses[0]


def test_default_loss_is_next_token_cross_entropy(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    batch = next(iter(toy_loader()))
    logits = model(batch["input_ids"])
    expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    assert torch.allclose(CausalLMModule(model)._loss(batch), expected, atol=1e-6)


def test_metrics_reach_the_tensorboard_logger(tmp_path) -> None:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(4), toy_loader(1))
    logged = scalars(trainer)
    assert len(logged["train/loss"]) == 4
    assert logged["train/lr"] == pytest.approx([1e-3] * 4)
    # The first batch has no previous batch end to measure from: no value is written for it. The first after
    # validation (step 2) is measured from validation's end.
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert [event.step for event in events.Scalars("train/tokens_per_s")] == [1, 2, 3]
    assert min(logged["train/tokens_per_s"]) > 0
    assert len(logged["train/grad_norm"]) == 4
    assert len(logged["val/loss"]) == 2


def test_tokens_per_s_counts_non_padding_labels(tmp_path, monkeypatch) -> None:
    clock = iter(range(100))
    monkeypatch.setattr("forgather.lightning.module.perf_counter", lambda: float(next(clock)))
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(3))
    # One second between batch ends; every row has one padded label.
    assert scalars(trainer)["train/tokens_per_s"] == [BATCH * (SEQ - 1)] * 2


def test_val_loss_is_the_token_weighted_epoch_mean(tmp_path) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(tiny_model())
    full = next(iter(toy_loader()))
    short = {key: value.clone() for key, value in full.items()}
    short["labels"][:, SEQ // 2 :] = -100
    with torch.no_grad():
        losses = [float(module._loss(batch)) for batch in (full, short)]
    targets = [BATCH * (SEQ - 2), BATCH * (SEQ // 2 - 1)]  # shifted labels that are not padding
    expected = sum(loss * n for loss, n in zip(losses, targets)) / sum(targets)
    (result,) = make_trainer(tmp_path, max_steps=1).validate(module, DataLoader([full, short], batch_size=None))
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(sum(losses) / 2, rel=1e-3)


def test_factory_model_is_built_in_configure_model(tmp_path) -> None:
    built = []

    def factory() -> CausalLM:
        built.append(tiny_model())
        return built[-1]

    module = CausalLMModule(factory)
    assert module.model is None and not built
    make_trainer(tmp_path, max_steps=1).fit(module, toy_loader(1))
    assert len(built) == 1
    assert module.model is built[0]


def test_optimizer_and_scheduler_factories_are_applied(tmp_path) -> None:
    module = CausalLMModule(
        tiny_model(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, toy_loader(3))
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert scalars(trainer)["train/lr"] == pytest.approx([0.1, 0.05, 0.025])


@pytest.mark.parametrize("factory", [functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.5),
                                     "forgather.optim:Adafactor", "forgather.optim.triton_adamw:TritonAdamW"])
def test_no_decay_1d_leaves_norm_gains_and_biases_out_of_weight_decay(factory) -> None:
    from forgather.graph.imports import import_spec

    if isinstance(factory, str):
        factory = functools.partial(import_spec(factory), lr=1e-3, weight_decay=0.5)
    model = tiny_model()
    groups = CausalLMModule(model, optimizer=factory, no_decay_1d=True).configure_optimizers().param_groups
    assert [len(group["params"]) for group in groups] == [
        sum(p.dim() >= 2 for p in model.parameters()), sum(p.dim() < 2 for p in model.parameters())]
    assert [group["weight_decay"] for group in groups] == [0.5, 0.0]
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["params"]
    (single,) = CausalLMModule(tiny_model(), optimizer=factory).configure_optimizers().param_groups
    assert single["weight_decay"] == 0.5
    with pytest.raises(TypeError, match=r"no_decay_1d='yes'\): give true or false"):
        CausalLMModule(tiny_model(), no_decay_1d="yes")


def test_epoch_interval_scheduler_waits_for_the_epoch(tmp_path) -> None:
    module = CausalLMModule(
        tiny_model(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_scheduler_interval="epoch",
    )
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, toy_loader(2))
    assert scalars(trainer)["train/lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05])


class GradNormCheck(pl.Callback):
    """Computes the norm by hand before the module's hook logs it, and compares after the step."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []
        self._manual = math.nan

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._manual = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((self._manual, float(trainer.callback_metrics["train/grad_norm"])))


def test_grad_norm_equals_manual_computation(tmp_path) -> None:
    check = GradNormCheck()
    make_trainer(tmp_path, max_steps=3, callbacks=[check]).fit(CausalLMModule(tiny_model()), toy_loader(3))
    assert len(check.pairs) == 3
    for manual, logged in check.pairs:
        assert logged == pytest.approx(manual, rel=1e-5)


def test_grad_norm_of_fsdp2_sharded_gradients_matches_unsharded(tmp_path) -> None:
    helper = Path(__file__).parent / "helpers" / "fsdp2_grad_norm.py"
    done = subprocess.run([sys.executable, str(helper), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 2
    for result in results:
        assert result["dtensor_grads"]
        assert result["sharded"] == pytest.approx(result["reference"], rel=1e-5)


class WeightsAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {name: value.clone() for name, value in pl_module.state_dict().items()}


def test_factory_model_resumes_from_a_checkpoint(tmp_path) -> None:
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(2))
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["state_dict"]
    start = WeightsAtStart()
    resumed = make_trainer(tmp_path, max_steps=4, callbacks=[start])
    resumed.fit(CausalLMModule(tiny_model), toy_loader(4), ckpt_path=tmp_path / "two.ckpt")
    assert resumed.global_step == 4
    assert start.state.keys() == saved.keys()
    assert all(torch.equal(start.state[name], saved[name]) for name in saved)


def test_rejects_an_unknown_scheduler_interval() -> None:
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        CausalLMModule(tiny_model(), lr_scheduler_interval="batch")


def test_compile_compiles_every_layer_in_place():
    from forgather.lightning.module import CausalLMModule
    from helpers.tiny_lm import tiny_model

    module = CausalLMModule(tiny_model(), compile=True)
    module.configure_model()
    module.configure_model()  # Lightning calls it per stage: compiling happens once
    assert all(layer._compiled_call_impl is not None for layer in module.model.layers)


def test_tokens_are_counted_once_per_batch_when_stages_split_the_model():
    from types import SimpleNamespace

    from forgather.lightning.module import CausalLMModule
    from helpers.tiny_lm import tiny_model

    module = CausalLMModule(tiny_model())
    for world_size, replicas, expected in ((4, 2, 2), (4, 4, 1), (1, None, 1)):
        kwargs = {"num_replicas": replicas} if replicas else None
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs=kwargs), world_size=world_size)
        assert module._ranks_per_batch() == expected


def test_grad_norm_is_computed_on_logged_steps_and_the_last_one(tmp_path, monkeypatch):
    import forgather.lightning.module as module_file

    computed = []
    norm = module_file.total_grad_norm
    monkeypatch.setattr(module_file, "total_grad_norm", lambda params: computed.append(1) or norm(params))
    trainer = make_trainer(tmp_path, max_steps=7, log_every_n_steps=3)
    trainer.fit(CausalLMModule(tiny_model()), train_dataloaders=toy_loader())
    assert len(computed) == 3  # steps 2, 5 and the last, 6
    assert [event.step for event in _grad_norm_events(trainer)] == [2, 5, 6]  # what the logger writes
    assert "train/grad_norm" in trainer.callback_metrics  # the last step's, for the run's final metrics


def _grad_norm_events(trainer: pl.Trainer):
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    return events.Scalars("train/grad_norm")


def test_tokens_per_s_covers_every_step_since_the_previous_write(tmp_path, monkeypatch) -> None:
    # Batch ends at t = 0, 1, 2, 3, 4 (step 1 opens the window); measured at steps 2, 4 and the last, 5.
    clock = iter(range(100))
    monkeypatch.setattr("forgather.lightning.module.perf_counter", lambda: float(next(clock)))
    trainer = make_trainer(tmp_path, max_steps=5, log_every_n_steps=2)
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(5))
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    written = [(event.step, event.value) for event in events.Scalars("train/tokens_per_s")]
    # 1 batch in 1 s, 2 batches in 2 s (the logger's step index is 0-based), and 1 batch in 1 s at the last step,
    # written too (the run's final numbers) ...
    assert written == [(1, BATCH * (SEQ - 1)), (3, BATCH * (SEQ - 1)), (4, BATCH * (SEQ - 1))]
    # ... and in the run's final metrics.
    assert float(trainer.callback_metrics["train/tokens_per_s"]) == BATCH * (SEQ - 1)


def test_progress_bar_reads_metrics_only_on_logged_steps(tmp_path, monkeypatch) -> None:
    from pytorch_lightning.callbacks import RichProgressBar

    from forgather.lightning.progress import ProgressBar

    reads = []
    original = RichProgressBar.get_metrics
    monkeypatch.setattr(RichProgressBar, "get_metrics",
                        lambda self, trainer, module: reads.append(trainer.global_step) or original(self, trainer, module))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=7, log_every_n_steps=3, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[ProgressBar()],
    )
    trainer.fit(CausalLMModule(tiny_model()), toy_loader(7))
    training_reads = sorted({step for step in reads if step > 0})
    assert training_reads == [1, 3, 6, 7]  # the first step shown, the logged steps and the last


def test_progress_bar_names_the_epoch_without_a_negative_total():
    from types import SimpleNamespace

    from forgather.lightning.progress import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(2).strip() == "Epoch 2"
    bar._trainer = SimpleNamespace(max_epochs=5)
    assert bar._get_train_description(2).strip() == "Epoch 2/4"


class _FoldingOptimizer(torch.optim.SGD):
    """An optimizer that takes clipping by norm into its step (as TritonAdamW): records the calls."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.clipped = []

    def clip_grad_norm_(self, max_norm):
        self.clipped.append(max_norm)


@pytest.mark.parametrize("strategy, algorithm, folds", [
    ("single", "norm", True), ("ddp", "norm", True), ("single", "value", False), ("fsdp", "norm", False),
])
def test_norm_clipping_goes_to_an_optimizer_that_folds_it_where_gradients_are_whole(strategy, algorithm, folds,
                                                                                     monkeypatch):
    """One device or DDP (whole gradients on each rank), clipping by norm: the optimizer's clip_grad_norm_;
    clipping by value, a sharded strategy, or an optimizer without the method: Lightning's own clipping."""
    module = CausalLMModule(tiny_model())
    optimizer = _FoldingOptimizer(module.parameters())
    strategies = {"single": pl.strategies.SingleDeviceStrategy(torch.device("cpu")),
                  "ddp": pl.strategies.DDPStrategy(), "fsdp": pl.strategies.FSDPStrategy()}
    attached = type("Trainer", (), {"strategy": strategies[strategy]})
    monkeypatch.setattr(CausalLMModule, "trainer", property(lambda self: attached))
    lightnings = []
    monkeypatch.setattr(pl.LightningModule, "configure_gradient_clipping",
                        lambda self, opt, val, algo: lightnings.append((opt, val, algo)))
    module.configure_gradient_clipping(optimizer, 0.5, algorithm)
    assert (optimizer.clipped, lightnings) == (([0.5], []) if folds else ([], [(optimizer, 0.5, algorithm)]))
    module.configure_gradient_clipping(torch.optim.SGD(module.parameters(), lr=0.1), 0.5, "norm")
    assert len(lightnings) == (1 if folds else 2)  # no clip_grad_norm_: Lightning's


def test_a_kernel_optimizer_measures_the_logged_grad_norm_in_its_step(tmp_path, monkeypatch):
    """Where TritonAdamW's kernel runs (emulated here on the CPU), a logged step's gradient norm is the one its
    step measured as it read the gradients (total_grad_norm is not called), logged after that step and before
    the callbacks' on_train_batch_end: the value a manual computation gives, on every logged step only."""
    import forgather.lightning.module as module_file
    from forgather.optim.triton_adamw import TritonAdamW
    from test_optim_triton_adamw import emulate_the_kernel

    class Check(GradNormCheck):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            logged = trainer.callback_metrics.get("train/grad_norm")
            self.pairs.append((self._manual, None if logged is None else float(logged)))

    kernel = emulate_the_kernel(monkeypatch)
    monkeypatch.setattr(module_file, "total_grad_norm", lambda params: pytest.fail("a pass of its own"))
    check = Check()
    module = CausalLMModule(tiny_model(), optimizer=functools.partial(TritonAdamW, lr=1e-3))
    trainer = make_trainer(tmp_path, max_steps=5, log_every_n_steps=2, callbacks=[check])
    trainer.fit(module, toy_loader(3))
    assert kernel.measured == [False, True, False, True, True]  # steps 1, 3 and the last are written
    assert check.pairs[0][1] is None
    for index in (1, 3, 4):
        manual, logged = check.pairs[index]
        assert logged == pytest.approx(manual, rel=1e-5)
    assert [event.step for event in _grad_norm_events(trainer)] == [1, 3, 4]
