"""`CausalLMModule`: a LightningModule that trains any causal LM with Forgather's model interface.

The model gives `hidden_states(input_ids, position_ids=None) -> [B, T, H]` and `lm_head_weight -> [V, H]`;
the loss takes `(hidden, weight, labels)` and shifts the labels itself, so a fused linear cross-entropy never
materializes the logits. Batches are dicts of LongTensor[B, T]: `input_ids`, optional `position_ids`, and
`labels` (default: the input ids; `ignore_index` -100 marks padding). Logged through `self.log` (so any
Lightning logger records them): `train/loss`, `train/lr`, `train/tokens_per_s` (label tokens that are not
padding, summed over ranks, per second over the steps since the previous write), `train/grad_norm` (total
2-norm before the optimizer step) and `val/loss` (epoch mean weighted by target tokens, synced).

Gradient accumulation (`accumulate_grad_batches=k`) and DDP follow the tokens, not the batches: the step's
gradient is that of the mean loss over every target token of its k batches on every rank, as one batch k x ranks
times larger would give (Lightning and DDP alone average the batch means, which weighs a padding-heavy batch's
tokens more and a short last window of an epoch less), and `train/loss` is that same token mean (over this rank's
batches). Each batch's loss is backpropagated times its targets over a scale S of the window (the value returned
stays the batch's loss); `on_before_optimizer_step` rescales the summed gradients by S x k x ranks over the
window's targets on all ranks, on the device, before clipping and the gradient norm (callbacks' own
on_before_optimizer_step run first and see them unscaled). S is near the mean's scale, which fp16's loss scaling
expects: on one process the first batch's target positions; under DDP the first batch's targets on all ranks over
the ranks (one all-reduce of a number; the same S on every rank, so DDP's mean of their gradients keeps the
weights), which with k = 1 makes the rescale exactly 1, so a DDP step without accumulation costs that one
all-reduce and no pass over the gradients. Where the strategy does not hold whole gradients averaged over
ranks (sharding strategies; a pipeline, which backpropagates its own loss) the gradients keep Lightning's
normalisation; `train/loss` is the token mean all the same.

No step makes the host wait for the GPU: throughput and the gradient norm are computed only on the steps the
loggers write (every `log_every_n_steps`, and the last); `train/loss` is not a progress-bar metric (Lightning
reads those after every batch); and the training metrics are logged with `logger=False` and reach the loggers
one step later, through `forgather.lightning.steps.DeferredMetrics`, with the step they belong to (Lightning's
logger connector would read them on their own step, draining the GPU's queue). So the host queues work ahead
of the device on every step.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from time import perf_counter
from typing import Any, Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from forgather.errors import UserError, did_you_mean
from forgather.lightning.memory import check_batch_fits
from forgather.lightning.steps import DeferredMetrics, writes_metrics
from forgather.loss.base import IGNORE_INDEX
from forgather.optim.in_backward import OptimizerInBackward

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# What the module logs at each step the loggers write, handed to them one step later (DeferredMetrics).
TRAIN_METRICS = ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm")

# torch.compile's modes (torch._inductor.list_mode_options()), None for its default.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CausalLMModule(pl.LightningModule):
    """Causal-LM training and validation around a model, a loss and optimizer/scheduler factories.

    Args:
        model: an `nn.Module`, or a zero-argument factory called in `configure_model` (so sharding
            strategies can build it late, on the right device).
        loss: `loss(hidden [B, T, H], weight [V, H], labels [B, T]) -> scalar`; default
            `forgather.loss.NaiveLoss()` (logits, then cross-entropy).
        optimizer: `optimizer(params) -> torch.optim.Optimizer`, e.g. `partial(torch.optim.AdamW, lr=3e-4)`;
            default AdamW at lr 1e-3.
        lr_scheduler: `lr_scheduler(optimizer) -> scheduler`, or None for a constant learning rate.
        lr: a base learning rate passed to `optimizer` as `lr=`, over the factory's own; None (the default) keeps
            the factory's. Lightning's LR finder (`Tuner(trainer).lr_find(module)`) sets it to its suggestion.
        lr_scheduler_interval: "step" or "epoch", when Lightning steps the scheduler.
        compile: `torch.compile` the model's forward (up to the hidden states; the loss outside stays free
            to be a fused kernel), with the scope `compile_scope`.
        compile_scope: "layers" (the default): each layer of `model.layers`, in place, torchtitan style: one
            compiled graph reused by every layer. "model": the whole of `model.hidden_states` (embedding,
            every layer, final norm) as one graph, so inductor can fuse across layer boundaries (the model
            object itself is not changed, so its state dict and export are not either).
        compile_mode: torch.compile's `mode` (COMPILE_MODES; None: its default), e.g.
            "max-autotune-no-cudagraphs" to let inductor tune its kernels (minutes more at the start).
        compile_options: inductor's settings (`torch._inductor.list_options()`), e.g.
            `{coordinate_descent_tuning: true}` to tune the pointwise and reduction kernels without the minutes
            of max-autotune's matmul search. With a `compile_mode` they are laid over the mode's own settings
            (torch.compile takes one or the other, not both).
        no_decay_1d: give the parameters of fewer than 2 dimensions (norm gains, biases) a param group of their
            own with weight_decay 0, the usual exclusion (off by default: one group, every parameter decays at
            the optimizer's weight_decay).
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        loss: LossFn | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        lr_scheduler_interval: str = "step",
        compile: bool = False,
        compile_scope: str = "layers",
        compile_mode: str | None = None,
        compile_options: dict[str, Any] | None = None,
        no_decay_1d: bool = False,
        lr: float | None = None,
    ) -> None:
        super().__init__()
        if compile_scope not in ("layers", "model"):
            raise ValueError(f"compile_scope={compile_scope!r}: choose 'layers' (each layer) or 'model' (all of them)")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r}: choose one of {COMPILE_MODES}")
        self.compile_options = _check_compile_options(compile_options)
        unused = [f"{name}={value!r}" for name, value, default in (
            ("compile_scope", compile_scope, "layers"), ("compile_mode", compile_mode, None),
            ("compile_options", self.compile_options or None, None)) if value != default]
        if unused and not compile:
            warnings.warn(f"{', '.join(unused)} only take{'s' if len(unused) == 1 else ''} effect with compile=true; "
                          f"the model runs uncompiled "
                          f"(set compile=true, or leave them out)", stacklevel=2)
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
        _check_factory("optimizer", optimizer, torch.optim.Optimizer, "functools.partial(torch.optim.AdamW, lr=3e-4)")
        _check_factory("lr_scheduler", lr_scheduler, torch.optim.lr_scheduler.LRScheduler,
                       "functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1000)")
        if loss is not None and (isinstance(loss, type) or not callable(loss)):
            raise TypeError(f"CausalLMModule(loss={loss!r}): loss takes a loss object called as "
                            "loss(hidden, weight, labels), e.g. forgather.loss.ChunkedLoss()"
                            + (" (an instance, not the class)" if isinstance(loss, type) else ""))
        if isinstance(model, nn.Module):
            _check_model_interface(model)
            self.model, self.model_factory = model, None
        elif callable(model):
            self.model, self.model_factory = None, model
        else:
            raise TypeError(f"model must be an nn.Module or a factory returning one, got {type(model).__name__}")
        if loss is None:
            from forgather.loss.naive import NaiveLoss

            loss = NaiveLoss()
        self.loss = loss
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-3)
        if not isinstance(no_decay_1d, bool):
            raise TypeError(f"CausalLMModule(no_decay_1d={no_decay_1d!r}): give true or false")
        self.no_decay_1d = no_decay_1d
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"CausalLMModule(lr={lr!r}): give a positive learning rate, or None for the optimizer's own")
        # The attribute Lightning's LR finder (Tuner.lr_find) reads and sets: when set, it replaces the rate the
        # optimizer factory gives (configure_optimizers passes it as lr=).
        self.lr = lr
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.compile = compile
        self.compile_scope, self.compile_mode = compile_scope, compile_mode
        self._compiled = False
        self._hidden_states: Callable[..., torch.Tensor] | None = None  # compile_scope "model": the compiled method
        self._window_tokens: torch.Tensor | int = 0  # label tokens since the window's start, on the device
        self._window_start: float | None = None
        self._window_step = -1  # the optimizer step at the window's start
        self._resume_window = False  # whether validation's end reopens the window
        self._fitting_batches: set[tuple[torch.Size, bool]] = set()
        self.deferred_metrics = DeferredMetrics(TRAIN_METRICS)
        self._grad_norm_from: torch.optim.Optimizer | None = None  # the optimizer measuring this step's norm
        # Gradient accumulation (module docstring): the sum of loss x targets over the batches accumulated for the
        # next step, and their targets (device tensors; None between steps), and the window's scale S
        self._accumulated_loss: torch.Tensor | None = None
        self._accumulated_targets: torch.Tensor | None = None
        self._accumulation_scale: torch.Tensor | int = 1
        self._val_totals: torch.Tensor | int = 0

    def configure_model(self) -> None:
        # Lightning calls this for every stage; build once.
        if self.model is None:
            self.model = _check_model_interface(self.model_factory())
        if self.compile and not self._compiled:
            options = _compile_arguments(self.compile_mode, self.compile_options)
            if self.compile_scope == "model":
                self._hidden_states = torch.compile(self.model.hidden_states, **options)
            else:
                for layer in self.model.layers:
                    layer.compile(**options)
            self._compiled = True

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids=position_ids)

    def predict_step(self, batch: Batch | torch.Tensor, batch_idx: int) -> torch.Tensor:
        """`trainer.predict`: the logits [B, T, V] of a batch, a dict as in training or the input ids alone."""
        if isinstance(batch, torch.Tensor):
            return self(batch)
        return self(batch["input_ids"], position_ids=batch.get("position_ids"))

    def configure_optimizers(self) -> Any:
        trained = [p for p in self.parameters() if p.requires_grad]
        if not trained:
            trained = self._nothing_to_train()
        elif self.no_decay_1d:
            decayed, kept = [p for p in trained if p.dim() >= 2], [p for p in trained if p.dim() < 2]
            trained = [group for group in ({"params": decayed}, {"params": kept, "weight_decay": 0.0}) if group["params"]]
        optimizer = self.optimizer_factory(trained, **self._rate())
        if isinstance(optimizer, OptimizerInBackward) and self._trainer is not None:
            _check_steps_in_backward(self._trainer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        schedule = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _rate(self) -> dict[str, float]:
        """`{"lr": self.lr}` for the optimizer factory, when a rate is set (the LR finder's suggestion, the user's)."""
        if self.lr is None:
            return {}
        try:
            parameters = inspect.signature(self.optimizer_factory).parameters
        except (TypeError, ValueError):  # a callable whose signature Python cannot read: left to the call
            parameters = None
        if parameters is not None and "lr" not in parameters and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            name = getattr(self.optimizer_factory, "__name__", None) or type(self.optimizer_factory).__name__
            raise UserError(f"CausalLMModule lr={self.lr}: the optimizer factory {name} takes no lr; set the rate in the "
                            f"factory (functools.partial(torch.optim.AdamW, lr=...)), or give one that takes lr=")
        return {"lr": float(self.lr)}

    def _nothing_to_train(self) -> list[dict[str, list]]:
        """No parameter of this module is trained. Where a strategy splits the model (pipeline stages), this rank
        may hold frozen stages only (frozen embeddings, a frozen bottom half): it still runs the schedule, with
        an optimizer of one empty param group, which steps nothing but keeps its learning rate and scheduler in
        step with the other ranks' (train/lr). Holding the whole model, there is nothing to train: refused in one
        line (torch would only say that the optimizer got an empty parameter list)."""
        if self._trainer is not None and self._ranks_per_batch() > 1:
            return [{"params": []}]
        raise UserError(f"every parameter of the model ({type(self.model).__name__}) is frozen (requires_grad=False), "
                        "so there is nothing to train; unfreeze some (requires_grad_(True)) before fit")

    # Training and validation

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._check_batch_fits(batch, training=True)
        loss = self._loss(batch)
        labels = _labels(batch)
        rows = labels.shape[0]
        logged = loss
        if self.trainer.accumulate_grad_batches > 1 or self._averaging_ranks() > 1:
            logged, loss = self._accumulate(loss, labels)
        # Not a progress-bar metric: Lightning turns those into numbers after every batch, a host wait each step
        # (forgather.lightning.ProgressBar shows the loss where the loggers write it).
        self._log_train("train/loss", logged, batch_size=rows)
        if writes_metrics(self.trainer, self.trainer.global_step + 1):
            # Only where it is written. A host tensor: Lightning keeps it on the host, where a float would become a
            # device tensor, a copy from pageable memory that waits for every queued kernel (tests/test_step_syncs.py).
            self._log_train("train/lr", self._learning_rate(), batch_size=rows)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._check_batch_fits(batch, training=False)
        loss = self._loss(batch)
        targets = (_labels(batch)[:, 1:] != self._ignore_index).sum()
        self._val_totals = self._val_totals + torch.stack([loss.detach().double() * targets, targets.double()])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_totals = 0  # [sum of loss x targets, targets] over this evaluation's batches, on the device

    def on_validation_epoch_end(self) -> None:
        """val/loss, the mean over every target token of the evaluation on every rank. Summed here: Lightning's
        own epoch mean weighted by batch_size averages the ranks' sums of batch sizes in their integer dtype,
        which truncates an odd total (a val/loss 0.05% high over 2,079 tokens on two ranks)."""
        totals = self._val_totals
        if not isinstance(totals, torch.Tensor):
            return  # no batch
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(totals)  # ranks holding one batch's pipeline stages count it alike
        self.log("val/loss", (totals[0] / totals[1].clamp(min=1)).float(), prog_bar=True)

    # Gradient accumulation by tokens (module docstring)

    def _accumulate(self, loss: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of an accumulation window: (the window's token-mean loss so far, to log; the loss to
        backpropagate, its gradient weighted by this batch's targets where the strategy averages whole
        gradients (`_averaging_ranks`), its value the batch's loss still, for callbacks that read
        `outputs["loss"]`)."""
        targets = (labels[:, 1:] != self._ignore_index).sum()  # the loss shifts the labels: its target tokens
        ranks = self._averaging_ranks()
        if self._accumulated_targets is None or self.trainer.accumulate_grad_batches == 1:
            self._accumulated_loss, self._accumulated_targets = 0, 0
            if ranks > 1:
                self._accumulation_scale = _all_ranks_sum(targets).clamp(min=1) / ranks
            elif ranks:
                self._accumulation_scale = max(1, labels[:, 1:].numel())
        self._accumulated_loss = self._accumulated_loss + loss.detach().float() * targets
        self._accumulated_targets = self._accumulated_targets + targets
        logged = self._accumulated_loss / self._accumulated_targets.clamp(min=1)
        if not ranks:
            return logged, loss
        weighted = loss * (targets / self._accumulation_scale)
        return logged, weighted + (loss - weighted).detach()

    def _averaging_ranks(self) -> int:
        """How many processes' gradients the strategy averages into the step's, where each holds whole
        gradients of the loss training_step returns (one device: 1; DDP: the world size); 0 where the gradients
        cannot be rescaled to the tokens' mean (sharded, or a pipeline's own backward)."""
        if type(self.trainer.strategy) not in (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy):
            return 0
        return self.trainer.world_size

    def _finish_accumulation(self) -> None:
        """At the optimizer step: the gradients, the rank mean of the sum over the window of (targets / S) x
        grad(batch mean), divided by accumulate_grad_batches by Lightning, become grad(window's token mean)."""
        targets, self._accumulated_targets = self._accumulated_targets, None
        self._accumulated_loss = None
        ranks, steps = self._averaging_ranks(), self.trainer.accumulate_grad_batches
        if targets is None or not ranks or steps == 1:
            return  # one batch on each of several ranks: S is their targets' mean already
        if ranks > 1:
            targets = _all_ranks_sum(targets)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        factor = (self._accumulation_scale * steps * ranks) / targets.clamp(min=1)
        if grads:
            torch._foreach_mul_(grads, factor.float())

    # Throughput and gradient norm

    def on_train_start(self) -> None:
        # Anew for each fit: one by another trainer counts its steps from 0 again (a step it writes must not pass
        # for one captured already), and shows no numbers of the previous fit.
        self.deferred_metrics = DeferredMetrics(TRAIN_METRICS)

    def on_train_epoch_start(self) -> None:
        self._restart_window()  # the gap since the previous epoch is not training time
        self._accumulated_loss = self._accumulated_targets = None  # Lightning accumulates anew each epoch

    def on_validation_start(self) -> None:
        self._resume_window = self._window_start is not None  # training's window, open before this validation
        self._restart_window()  # nor is validation
        self.deferred_metrics.flush(self.trainer)  # the last training row before validation's

    def on_validation_end(self) -> None:
        if self._resume_window:
            # reopened now, not at the next batch's end: that batch's step gets its rate (val/loss was read, so
            # no validation work is left queued to count)
            self._resume_window = False
            self._restart_window(perf_counter())

    def on_train_end(self) -> None:
        self.deferred_metrics.flush(self.trainer)

    def configure_callbacks(self) -> list[pl.Callback]:
        if any(isinstance(callback, _FlushMetricsOnException) for callback in self.trainer.callbacks):
            return []  # added by an earlier fit/validate of this trainer: returned again, Lightning notes the swap
        return [_FlushMetricsOnException()]

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        # The previous written step's metrics: its kernels ran while this step was queued, so this waits for none.
        self.deferred_metrics.flush(self.trainer)
        self._measure_throughput(batch)
        self._log_measured_grad_norm()  # where optimizer_step did not (manual optimization)
        self.deferred_metrics.capture(self.trainer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._log_measured_grad_norm()  # before the callbacks' on_train_batch_end, which may read it

    def _log_measured_grad_norm(self) -> None:
        """The gradient norm the optimizer's step measured (`_step_measures_grad_norm`), logged after that step:
        self.log copies the value on the stream at once, which before the step would read it unwritten."""
        measured, self._grad_norm_from = self._grad_norm_from, None
        if measured is not None and (norm := measured.take_grad_norm()) is not None:
            self._log_train("train/grad_norm", norm, batch_size=1)

    def _measure_throughput(self, batch: Batch) -> None:
        if not isinstance(batch, Mapping):
            return  # a subclass's batches of its own format: no labels to count
        now = perf_counter()
        if self._window_start is None:
            # The window opens at the end of the first batch: what came before it (compilation, data loader
            # start, validation) is not training time.
            self._restart_window(now)
            return
        # Counted here, not in training_step, which a subclass may replace.
        self._window_tokens = self._window_tokens + (_labels(batch) != self._ignore_index).sum()
        step = self.trainer.global_step  # optimizer steps done (unchanged between accumulated batches)
        if step == self._window_step or not writes_metrics(self.trainer, step):
            return
        # Summed over ranks below; ranks that hold other pipeline stages of the same batch count it once.
        rate = self._window_tokens / (now - self._window_start) / self._ranks_per_batch()
        self._log_train("train/tokens_per_s", rate, sync_dist=True, reduce_fx="sum", batch_size=1)
        self._restart_window(now)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._finish_accumulation()  # first: clipping and the norm see the accumulated gradient
        # The norm is a pass over every gradient (a collective under model-splitting strategies): only on the
        # steps whose metrics the logger writes.
        if not writes_metrics(self.trainer, self.trainer.global_step + 1):
            return
        strategy = self.trainer.strategy
        if callable(getattr(strategy, "grad_norm", None)):
            # A strategy that splits the model (pipeline stages) knows the norm over all of it.
            norm = strategy.grad_norm()
        elif isinstance(strategy, pl.strategies.FSDPStrategy):
            # FSDP1 holds flat local shards; its root reduces them (an infinite threshold clips nothing).
            norm = strategy.model.clip_grad_norm_(math.inf)
        elif self._step_measures_grad_norm(optimizer):
            return  # logged after the step that measures it (_log_measured_grad_norm)
        else:
            norm = total_grad_norm(self.parameters())
        if norm is not None:
            self._log_train("train/grad_norm", norm, batch_size=1)

    def _step_measures_grad_norm(self, optimizer: torch.optim.Optimizer) -> bool:
        """Ask an optimizer that can (TritonAdamW on a GPU: `folds_grad_norm`) for this step's gradient norm:
        its kernel sums the squares as it reads the gradients, or its clipping has the norm already, so no pass
        of its own (1.06 ms a logged step at the 1.24B shape on an H200). Only for whole gradients (one device,
        DDP) that the optimizer holds all of; else total_grad_norm, as before."""
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper, if handed one
        whole = type(self.trainer.strategy) in (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)
        if not (whole and callable(getattr(inner, "folds_grad_norm", None)) and inner.folds_grad_norm()):
            return False
        held = {id(p) for group in inner.param_groups for p in group["params"]}
        if not all(id(p) in held for p in self.parameters() if p.grad is not None):
            return False
        inner.request_grad_norm()
        self._grad_norm_from = inner
        return True

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clipping by norm goes to an optimizer that folds it into its step (TritonAdamW.clip_grad_norm_: the
        gradients scaled as its kernel reads them, not by a pass of their own), where each rank holds whole
        gradients (one device, DDP); anything else is Lightning's clipping."""
        clip = getattr(optimizer, "clip_grad_norm_", None)
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm").lower()
        strategy = self.trainer.strategy
        whole = type(strategy) in (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)
        if callable(clip) and gradient_clip_val and algorithm == "norm" and whole:
            clip(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # Helpers

    def _log_train(self, name: str, value: Any, **kwargs: Any) -> None:
        """A training metric of this step: for callbacks now (`callback_metrics`), for the loggers one step later
        (DeferredMetrics), which Lightning's logger connector would read on this step, a wait for the GPU."""
        self.log(name, value, on_step=True, on_epoch=False, logger=False, **kwargs)
        self.deferred_metrics.logged(name)

    def _restart_window(self, now: float | None = None) -> None:
        self._window_tokens, self._window_start = 0, now
        self._window_step = self.trainer.global_step if now is not None else -1

    def _ranks_per_batch(self) -> int:
        """How many ranks work on each batch: 1, except under model-splitting strategies such as pipelining."""
        strategy = self.trainer.strategy
        replicas = (getattr(strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas")
        return max(1, self.trainer.world_size // replicas) if replicas else 1

    @property
    def _ignore_index(self) -> int:
        return getattr(self.loss, "ignore_index", IGNORE_INDEX)

    def _check_batch_fits(self, batch: Batch, training: bool) -> None:
        """Refuse (once per batch shape) a batch whose activations cannot fit (forgather.lightning.memory)."""
        ids = batch["input_ids"]
        if (ids.shape, training) in self._fitting_batches:
            return
        precision = str(self._trainer.precision) if self._trainer is not None else "32"
        check_batch_fits(self.model, ids.shape, ids.device, 2 if "16" in precision else 4, training)
        self._fitting_batches.add((ids.shape, training))

    def _loss(self, batch: Batch) -> torch.Tensor:
        hidden_states = self._hidden_states or self.model.hidden_states
        hidden = hidden_states(batch["input_ids"], position_ids=batch.get("position_ids"))
        return self.loss(hidden, self.model.lm_head_weight, _labels(batch))

    def _learning_rate(self) -> torch.Tensor:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        # A rate kept in a device tensor (CompiledAdamW) is logged as a copy, without waiting for the device;
        # the scheduler fills that tensor in place later. A float stays on the host (float32, as Lightning logs one).
        return lr.detach().clone() if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float32)


def _check_compile_options(options: Any) -> dict[str, Any]:
    """`compile_options` as a plain dict whose every key is a setting of inductor's (a misspelled one is named
    with its close matches: torch would only say it is unknown once the first compile starts)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"compile_options must be a mapping of inductor settings, e.g. "
                        f"{{coordinate_descent_tuning: true}}; got {type(options).__name__} {options!r}")
    from torch._inductor import config, list_options

    known = list_options()
    current = config.get_config_copy()
    for key, value in options.items():
        if key not in known:
            hint = did_you_mean(str(key), known)
            raise UserError(f"compile_options: {key!r} is not a setting of inductor's"
                            f"{'; ' + hint if hint else ''} (all of them: torch._inductor.list_options())")
        expected = _SETTING_TYPES.get(type(current.get(key)))
        if expected is None:
            continue
        kinds, described = expected
        # bool is an int to Python; a number setting given true/false is a mistake all the same
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise UserError(f"compile_options: {key} takes {described} (it is {current[key]!r} now); "
                            f"got {type(value).__name__} {value!r}")
    return dict(options)


# The type a setting's current value has -> what a new value must be, and how to say so. Settings whose value
# is None, a list or a dict take more than one kind of value: torch checks those when it compiles.
_SETTING_TYPES: dict[type, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"), str: (str, "a string"),
}


def _compile_arguments(mode: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """torch.compile's keyword arguments: `mode`, or, with options, the mode's settings overlaid by them."""
    if not options:
        return {"mode": mode} if mode else {}
    from torch._inductor import list_mode_options

    return {"options": {**(list_mode_options(mode) if mode else {}), **options}}


def _check_factory(name: str, value: Any, built: type, example: str) -> None:
    """`value` must be None or a factory called later with the parameters (or the optimizer), not a built object."""
    if value is None or (callable(value) and not isinstance(value, built)):
        return
    shown = f"{type(value).__name__}(...)" if isinstance(value, built) else repr(value)  # an optimizer's repr is long
    what = "one already built" if isinstance(value, built) else type(value).__name__
    raise TypeError(f"CausalLMModule({name}={shown}): got {what}; {name} takes a factory that the module calls "
                    f"in configure_optimizers, e.g. {example}")


def _check_model_interface(model: Any) -> nn.Module:
    """The model, if it has the interface the module trains through (the module docstring); else a TypeError."""
    missing = [name for name in ("hidden_states", "lm_head_weight") if not hasattr(model, name)]
    if not isinstance(model, nn.Module) or missing:
        lacks = f"lacks {' and '.join(missing)}" if isinstance(model, nn.Module) else "is not an nn.Module"
        raise TypeError(f"CausalLMModule(model=...): the model, a {type(model).__name__}, {lacks}; give a model with "
                        "hidden_states(input_ids, position_ids=None) -> [B, T, H] and lm_head_weight -> [V, H], "
                        "e.g. forgather.models.causal_lm.CausalLM")
    return model


def _labels(batch: Batch) -> torch.Tensor:
    return batch["labels"] if "labels" in batch else batch["input_ids"]


def total_grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """Total 2-norm of all gradients; None when no parameter holds one.

    Replicated gradients (single device, DDP) are complete on every rank; DTensor gradients (FSDP2,
    tensor parallel) are reduced across their mesh by `full_tensor`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _all_ranks_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks of a count on the device. A plain all-reduce, which the device queues like a kernel:
    Lightning's strategy.reduce adds a barrier, which makes the host wait for the GPU."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total


def _check_steps_in_backward(trainer: pl.Trainer) -> None:
    """An optimizer that steps each parameter inside backward has stepped before Lightning would clip the
    gradients, add the next batch's to them, or unscale them (fp16's loss scaling): clipping and accumulation
    would silently do nothing, and the steps would take gradients times the loss scale (65536 at the start), with
    no step skipped where they overflowed."""
    what = "the optimizer steps each parameter inside backward (OptimizerInBackward), before Lightning could"
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise UserError(f"precision={trainer.precision}: {what} unscale its gradient (fp16's loss scaling) or skip "
                        "a step whose gradients overflowed ; train in precision=bf16-mixed or 32-true, or choose an "
                        "optimizer that steps after backward")
    if trainer.gradient_clip_val:
        raise UserError(f"gradient_clip_val={trainer.gradient_clip_val}: {what} clip its gradient ; set "
                        "gradient_clip_val=null, or choose an optimizer that steps after backward")
    if trainer.accumulate_grad_batches > 1:
        raise UserError(f"accumulate_grad_batches={trainer.accumulate_grad_batches}: {what} add the next batches' "
                        "gradients ; leave the trainer's accumulate_grad_batches at 1, or choose an optimizer that "
                        "steps after backward")


class _FlushMetricsOnException(pl.Callback):
    """Writes the last captured training metrics when fit fails (Lightning tells callbacks, not the module): the
    row of the step before the failure is not lost. A failing GPU may fail this too: then the error in flight
    stays the one reported."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        deferred = getattr(pl_module, "deferred_metrics", None)
        if deferred is None:
            return
        try:
            deferred.flush(trainer)
        except Exception as error:  # noqa: BLE001 -- the exception in flight is the one to report
            warnings.warn(f"the last training metrics were not written: {error}", stacklevel=1)
