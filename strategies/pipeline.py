"""`PipelineParallelStrategy`: pipeline parallelism (torch.distributed.pipelining) as a Lightning strategy.

Contract with the LightningModule: it has a `model` (a forgather CausalLM, or an nn.Sequential) and a `loss`
(`loss(hidden, weight, labels)`, resp. `loss(output, target)`, a mean over tokens / rows), and its
`training_step` / `validation_step` compute `loss` from `model` and log it -- `CausalLMModule` as it is.
Hooks implemented:
- `setup_environment`: process group and the ("pp", "dp") device mesh (pipeline stages x replicas).
- `setup`: cuts `module.model` into stages (pipeline_runtime.py), prunes it in place to this rank's stages,
  so `configure_optimizers` sees only this rank's parameters (one optimizer per stage), and moves it; refuses
  an optimizer that steps inside backward (OptimizerInBackward): the schedule runs one backward a microbatch.
- `training_step`: runs the schedule (forward and backward of every microbatch, loss on the last stage,
  broadcast), then calls the module's own `training_step` with `model` and `loss` stood in for by stand-ins
  that return the pipeline's loss, so its logging runs unchanged; `backward` then only fires the backward
  hooks (the schedule did the backward). `validation_step` likewise, forward only. The first batch of a fit
  is compared between the pipeline's ranks (`PipelineRuntime.check_same_batch`): they must read the same.
- gradient clipping by norm uses the norm over all stages; `grad_norm()` gives it for logging.
- at the end of fit, global rank 0's LightningModule holds the whole model again (`gather_at_end`); a later fit
  prunes it to that rank's stages again (`setup`).
- checkpoints are sharded (torch.distributed.checkpoint, a directory: each rank writes its stages, the tied
  head once, its optimizer states keyed by parameter name: `optimizer_state`), written beside the target and
  renamed into place; `forgather.strategies.load_sharded_checkpoint` loads one into a single-device model.
  meta.pt carries a format key: another strategy's sharded directory is refused as ckpt_path (`load_checkpoint`).
  Staging that a killed save left (`.NAME.tmp-PID`) goes when the next fit starts (`_remove_stale_staging`).
- a rank whose stages are all frozen runs the schedule with an optimizer over nothing (CausalLMModule's);
  frozen everywhere, a fit is refused (`_check_something_trains`).

From a plain Lightning script (Lightning starts the other processes by running the script again, hence the
`__main__` guard; tests/helpers/plain_lightning_train.py is a whole one):

    if __name__ == "__main__":
        module = CausalLMModule(model, loss, functools.partial(torch.optim.AdamW, lr=3e-4))
        strategy = PipelineParallelStrategy("1F1B", n_microbatches=4)  # batch_size: a multiple of 4
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=100)  # or "gpu"
        trainer.fit(module, DataLoader(rows, batch_size=8, drop_last=True))
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.utilities.load import _METADATA_FILENAME as METADATA_FILENAME
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.strategies import ModelParallelStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.optim import Optimizer

from forgather.errors import UserError
from forgather.lightning.checkpoint_io import remove_staging
from forgather.lightning.process_group import destroy_gloo_group_at_exit
from forgather.optim.in_backward import OptimizerInBackward

from .checkpoint import FORMAT, FORMAT_KEY, foreign_checkpoint, load_sharded, optimizer_state, swap_into_place
from .pipeline_runtime import PipelineRuntime, pipeline_mesh, schedule_class_for


# A sharded save's staging directory: `.NAME.tmp-PID` (`.NAME.tmp` from before the pid was in the name)
_SHARDED_STAGING = re.compile(r"^\.(?P<target>.+)\.tmp(?:-\d+)?$")


class PipelineParallelStrategy(ModelParallelStrategy):
    """Pipeline-parallel training across the devices of a Trainer, optionally with data-parallel replicas.

    Args:
        schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble or DualPipeV.
        n_microbatches: microbatches per batch (the per-replica batch size must divide by it).
        pipeline_parallel_size: ranks per pipeline; "auto" is every rank (no data parallelism). The world
            size must divide by it; the quotient is the number of data-parallel replicas.
        stages_per_rank: virtual stages per rank; default 1 for GPipe/1F1B, 2 for the multi-stage schedules.
        split_points: first layer of every stage after the first; default: balanced by layer cost.
        gather_at_end: when fit ends, before any other callback's `on_train_end`, gather the whole model
            into the LightningModule of global rank 0 (on the CPU), so that exporting it works as on one device.
        process_group_backend, timeout: as for Lightning's other distributed strategies.
    """

    def __init__(
        self,
        schedule: str = "1F1B",
        n_microbatches: int = 4,
        pipeline_parallel_size: int | Literal["auto"] = "auto",
        stages_per_rank: int | None = None,
        split_points: Sequence[int] | None = None,
        gather_at_end: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend,
                         timeout=timeout)
        schedule_class_for(schedule, n_microbatches, stages_per_rank)  # mistakes show before any process starts
        if pipeline_parallel_size != "auto" and (
            not isinstance(pipeline_parallel_size, int) or isinstance(pipeline_parallel_size, bool)
            or pipeline_parallel_size < 1
        ):
            raise ValueError(f"pipeline_parallel_size={pipeline_parallel_size!r} (config value "
                             "`pipeline_parallel_size`) must be 'auto' or a whole number of at least 1")
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.pipeline_parallel_size = pipeline_parallel_size
        self.stages_per_rank = stages_per_rank
        # Any sequence but a string: a config's list may come as OmegaConf's ListConfig (Hydra's instantiate).
        if split_points is not None and (not isinstance(split_points, Sequence) or isinstance(split_points, str)):
            raise ValueError(f"split_points={split_points!r} (config value `split_points`) must be a list of layer "
                             "indices, the first layer of each stage after the first (e.g. [8]), or null to balance")
        self.split_points = list(split_points) if split_points is not None else None
        self.gather_at_end = gather_at_end
        self.runtime: PipelineRuntime | None = None
        self._batch_grads: list[torch.Tensor | None] = []
        self._window: tuple[torch.Tensor, torch.Tensor | int] | None = None  # accumulation: (scale, count so far)
        self._batch_checked = False  # whether this fit's first batch was found alike on the pipeline's ranks

    # Processes and the device mesh

    def setup_environment(self) -> None:
        self._setup_distributed()
        destroy_gloo_group_at_exit()
        pp_size = self.world_size if self.pipeline_parallel_size == "auto" else self.pipeline_parallel_size
        if self.world_size % pp_size:
            raise ValueError(
                f"pipeline_parallel_size={pp_size} (config value `pipeline_parallel_size`) must divide the "
                f"number of processes, {self.world_size} (devices x nodes): change either, or leave it 'auto'"
            )
        self._device_mesh = pipeline_mesh(self.root_device.type, pp_size, self.world_size // pp_size)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a pipeline reads the same batches; replicas read different ones.
        replicas = self.device_mesh["dp"]
        return {"num_replicas": replicas.size(), "rank": replicas.get_local_rank()}

    # Model and optimizers

    def setup(self, trainer: pl.Trainer) -> None:
        self.accelerator.setup(trainer)
        self._check_precision()
        if self.runtime is None:
            self.runtime = self._build_runtime()
        elif trainer.state.fn == TrainerFn.FITTING:
            self.runtime.repipeline()  # a fit after one that gathered the whole model: this rank's stages again
        self._batch_checked = False
        if self.gather_at_end and not any(isinstance(callback, _GatherAtTrainEnd) for callback in trainer.callbacks):
            trainer.callbacks.insert(0, _GatherAtTrainEnd())
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._clip_across_stages()
        if trainer.state.fn == TrainerFn.FITTING:
            self._remove_stale_staging(trainer)
            self.setup_optimizers(trainer)
            _check_optimizers(self.optimizers)
            self._check_something_trains()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _check_something_trains(self) -> None:
        """A rank of frozen stages only trains on with an optimizer over nothing (CausalLMModule); frozen on every
        rank, nothing would train at all: refused on every rank (a collective), in one line."""
        trained = torch.tensor(float(sum(p.requires_grad for p in self.runtime.parameters())), device=self.root_device)
        torch.distributed.all_reduce(trained)
        if not trained:
            raise UserError("every parameter of the model is frozen (requires_grad=False) on every pipeline stage, "
                            "so there is nothing to train; unfreeze some (requires_grad_(True)) before fit")

    def _build_runtime(self) -> PipelineRuntime:
        """Cut the module's model into this rank's stages (pruning the rest) and set up the schedule."""
        module = self.lightning_module
        _check_module(module)
        return PipelineRuntime(
            module.model, module.loss, self.device_mesh, self.root_device, self.schedule,
            self.n_microbatches, self.stages_per_rank, self.split_points,
        )

    def _check_precision(self) -> None:
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"{type(self).__name__} does not support fp16 loss scaling ('16-mixed'): the schedule runs "
                "backward itself; use '32-true', 'bf16-mixed' or 'bf16-true'"
            )

    def _clip_across_stages(self) -> None:
        # Lightning clips by norm through the precision plugin with the norm of the optimizer's parameters;
        # a stage holds only its own gradients, so the plugin instance is given the norm over all stages.
        plugin = self.precision_plugin
        self.precision_plugin = plugin  # pinned: while none is set, the getter makes a new one every time
        plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        self.runtime.clip_grad_norm_(clip_val)

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole pipelined model's gradients (a collective: call it on every rank)."""
        return self.runtime.grad_norm()

    # Checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes sharded checkpoints itself; storage_options is unsupported")
        path = Path(self.broadcast(os.fspath(filepath)))
        # The saving rank's pid in the name: remove_staging (`_remove_stale_staging`) keeps a live process's.
        staging = path.with_name(f".{path.name}.tmp-{self.broadcast(os.getpid())}")
        if self.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        optimizers = checkpoint.pop("optimizer_states", [])
        state = {"state_dict": checkpoint.pop("state_dict"), **{f"optimizer_{i}": s for i, s in enumerate(optimizers)}}
        dcp.save(state, checkpoint_id=staging)
        if self.is_global_zero:
            torch.save({**checkpoint, FORMAT_KEY: FORMAT}, staging / METADATA_FILENAME)
            swap_into_place(staging, path)
        self.barrier()

    def _remove_stale_staging(self, trainer: pl.Trainer) -> None:
        """On the saving rank, delete what sharded saves killed mid-write left beside the checkpoints of this
        fit's ModelCheckpoint callbacks (`.NAME.tmp-PID`; `.NAME.tmp` before the pid was in the name), by the rule
        of forgather.lightning.checkpoint_io.remove_staging: a live process's stays, an `.old` aside goes back."""
        if not self.is_global_zero:
            return
        for directory in {callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath}:
            directory = Path(directory)
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                staged = _SHARDED_STAGING.match(entry.name)
                if staged is not None and entry.is_dir():
                    remove_staging(directory, staged["target"])

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Flat, keyed by parameter name (checkpoint.optimizer_state): ranks hold different parameters.
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer_state(self.lightning_module, optimizer)

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(os.fspath(checkpoint_path)))
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path {path} does not exist; give a checkpoint directory this strategy wrote")
        if not (path / METADATA_FILENAME).is_file():
            # A directory without it is none of this strategy's saves, which appear whole or not at all.
            weights = ("a torch.distributed.checkpoint directory's weights, load them into the module before fit "
                       "(forgather.strategies.load_sharded_checkpoint(path, module))" if path.is_dir() else
                       "a single-device checkpoint's weights, load them into the module before fit "
                       "(module.load_state_dict(torch.load(path)['state_dict']))")
            raise ValueError(
                f"ckpt_path {path} is not a sharded checkpoint directory written by {type(self).__name__} (no "
                f"{METADATA_FILENAME}); to start from {weights} and fit without ckpt_path"
            )
        meta = torch.load(path / METADATA_FILENAME, weights_only=weights_only)
        if (other := foreign_checkpoint(path, meta)) is not None:
            raise ValueError(
                f"ckpt_path {path} is {other}, not one written by {type(self).__name__}; resume it with the "
                "strategy that wrote it, or consolidate it into one file (python -m "
                "pytorch_lightning.utilities.consolidate_checkpoint DIR), load its state_dict into the module "
                "before fit and fit without ckpt_path"
            )
        load_sharded(path, self.lightning_module, self.optimizers, strict=self.lightning_module.strict_loading)
        meta.pop(FORMAT_KEY, None)
        return meta

    # Steps

    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        # The most batches an epoch reads: limit_train_batches may end every epoch before its short batch.
        batches = trainer.num_training_batches
        if trainer.max_steps > 0:
            batches = min(batches, trainer.max_steps * trainer.accumulate_grad_batches)
        check_train_batches(trainer.train_dataloader, self.n_microbatches, batches)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not self._batch_checked:  # once a fit: a collective
            self.runtime.check_same_batch(batch)
            self._batch_checked = True
        # Lightning zeroes gradients between training_step and backward: this batch's gradients wait aside
        # until `backward`, and the ones accumulated before it stay where zero_grad expects them.
        parameters = self.runtime.parameters()
        earlier = _exchange_grads(parameters, [None] * len(parameters))
        count = self.runtime.count(batch)
        if self._window is None or self.lightning_module.trainer.accumulate_grad_batches == 1:
            # One scale for the window (the runtime's docstring): near the mean's, the same on every replica
            scale = self.runtime.replica_sum(count).clamp(min=1) / self.runtime.dp_size
            self._window = (scale, 0)
        scale, counted = self._window
        self._window = (scale, counted + count)
        with self.precision_plugin.train_step_context():
            loss = self.runtime.step(batch, scale)
        self._batch_grads = _exchange_grads(parameters, earlier)
        with _stand_ins(self.lightning_module, loss):
            return self.lightning_module.training_step(batch, batch_idx)

    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        # The schedule ran backward in training_step; here its gradients are added, between the usual hooks.
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in zip(self.runtime.parameters(), self._batch_grads):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad
        self._batch_grads = []
        return self.precision_plugin.post_backward(closure_loss, module)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        def closure_then_token_mean() -> Any:
            result = closure()  # the window's last batch: its training_step and backward
            self._finish_window()
            return result

        return super().optimizer_step(optimizer, closure_then_token_mean, model, **kwargs)

    def _finish_window(self) -> None:
        """Before clipping, the gradient norm and the step: the window's summed gradients, each batch's over the
        window's scale, become the mean's over every term of the window on every replica."""
        window, self._window = self._window, None
        if window is None or self.lightning_module.trainer.accumulate_grad_batches == 1:
            return  # one batch: its scale was the replicas' mean count already
        scale, counted = window
        self.runtime.scale_grads(scale * self.runtime.dp_size / self.runtime.replica_sum(counted).clamp(min=1))

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        with self.precision_plugin.val_step_context():
            loss = self.runtime.evaluate(batch)
        with _stand_ins(self.lightning_module, loss):
            return self.lightning_module.validation_step(batch, batch_idx)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} trains and validates; test on a single-device model")

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} trains and validates; load the checkpoint into a single-device model "
            "(forgather.strategies.load_sharded_checkpoint) to predict"
        )


def check_train_batches(loader: Any, n_microbatches: int, batches: float | None = None) -> None:
    """Refuse, before the first step, a training loader one of whose batches would not cut into `n_microbatches`
    equal microbatches (the runtime refuses such a batch when it comes: for the short last batch of an epoch,
    after a whole epoch of training), unless no epoch reaches that one: each reads at most `batches` batches
    (limit_train_batches; max_steps). Loaders whose length is unknown (iterable datasets) are left to the runtime."""
    batch_size, sampler = getattr(loader, "batch_size", None), getattr(loader, "sampler", None)
    if not isinstance(batch_size, int) or sampler is None:
        return
    if batch_size % n_microbatches:
        raise ValueError(f"batch_size={batch_size} does not cut into n_microbatches={n_microbatches} equal "
                         f"microbatches (config values `batch_size`, `n_microbatches`): make batch_size a multiple "
                         f"of n_microbatches")
    try:
        rows = len(sampler)
    except TypeError:
        return
    last = rows % batch_size
    reached = batches is None or batches > rows // batch_size
    if last % n_microbatches and reached and not getattr(loader, "drop_last", False):
        raise ValueError(f"each epoch ends with a batch of {last} rows ({rows} blocks a replica, batch_size="
                         f"{batch_size}), which does not cut into n_microbatches={n_microbatches} equal "
                         f"microbatches and would stop the run at the end of the first epoch: set drop_last=true "
                         f"(config value `drop_last`; DataLoader(drop_last=True)) to leave it out")


def _check_module(module: pl.LightningModule) -> None:
    """Refuse a LightningModule the strategy cannot pipeline, saying what to change."""
    for name in ("model", "loss"):
        if not isinstance(getattr(module, name, None), nn.Module):
            raise TypeError(
                f"PipelineParallelStrategy needs the LightningModule's `{name}` (an nn.Module) to cut into "
                f"stages; {type(module).__name__} has none (CausalLMModule has both)"
            )
    # The whole model's compiled forward would run on this rank's pruned model, not through the stand-ins.
    if getattr(module, "compile", False) and getattr(module, "compile_scope", None) == "model":
        raise ValueError(
            "compile_scope='model' compiles the whole model's forward as one graph, but PipelineParallelStrategy "
            "cuts the model into stages: use compile_scope='layers' (config value `compile_scope`)"
        )


def _check_optimizers(optimizers: list[Optimizer]) -> None:
    """Refuse an optimizer that steps inside backward: the schedule runs a backward for every microbatch."""
    for optimizer in optimizers:
        if isinstance(optimizer, OptimizerInBackward):
            raise ValueError(
                "OptimizerInBackward steps each parameter inside backward, but PipelineParallelStrategy runs a "
                "backward for every microbatch: it would step n_microbatches times a batch, each on one "
                "microbatch's gradient, before the stages' and replicas' gradients are summed; choose an optimizer "
                "that steps after backward (config value `optimizer`, e.g. optimizer=adamw)"
            )


def _exchange_grads(parameters: list[nn.Parameter], grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Put `grads` in place of the parameters' gradients; returns the ones taken out."""
    taken = [p.grad for p in parameters]
    for p, grad in zip(parameters, grads):
        p.grad = grad
    return taken


class _GatherAtTrainEnd(pl.Callback):
    """Runs first at the end of fit: the LightningModule of global rank 0 gets the whole model back."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if strategy.device_mesh["dp"].get_local_rank() == 0:
            strategy.runtime.unpipeline()


class _ModelStandIn(nn.Module):
    """Stands in for the pipelined model inside the module's step: the pipeline already produced the loss."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0)

    def hidden_states(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return torch.empty(0)


class _LossStandIn(nn.Module):
    """Stands in for the module's loss: returns the pipeline's loss, keeping the real loss's ignore_index."""

    def __init__(self, value: torch.Tensor, loss: nn.Module) -> None:
        super().__init__()
        self.value = value
        if hasattr(loss, "ignore_index"):
            self.ignore_index = loss.ignore_index

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value


@contextmanager
def _stand_ins(module: pl.LightningModule, loss: torch.Tensor) -> Iterator[None]:
    model, real_loss = module.model, module.loss
    module.model, module.loss = _ModelStandIn(), _LossStandIn(loss, real_loss)
    try:
        yield
    finally:
        module.model, module.loss = model, real_loss

