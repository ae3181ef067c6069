"""Resume, state-dict checks and gradient accumulation across forgather's optimizers and CausalLMModule, on CPU.

A multi-day run stops and resumes: the optimizer's state dict saved mid-training and loaded into a fresh
optimizer must continue bit for bit as the uninterrupted run, a state dict of another optimizer or of other
parameters must be refused with the mismatch named, and accumulating k batches must take the step of one batch k
times larger.
"""

import copy
import functools
import io
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.utils.data import DataLoader

from forgather.errors import UserError
from forgather.lightning.module import CausalLMModule
from forgather.optim import (Adafactor, AdamW, ApolloAdamW, CompiledAdamW, GaLoreAdamW, TritonAdamW,
                             optimizer_in_backward)
from helpers.ranks import start_ranks, wait_all
from helpers.tiny_lm import padded_batch, tiny_model

HELPERS = Path(__file__).parent / "helpers"

OPTIMIZERS = {
    "adamw_sr": functools.partial(AdamW, lr=1e-2),
    "adamw_sr_fp32_state": functools.partial(AdamW, lr=1e-2, state_dtype=torch.float32),
    "adafactor": functools.partial(Adafactor, lr=1e-2, beta1=0.9, weight_decay=0.1),
    "compiled_adamw": functools.partial(CompiledAdamW, lr=1e-2),
    "triton_adamw_sr": functools.partial(TritonAdamW, lr=1e-2, stochastic_rounding=True),
    "galore": functools.partial(GaLoreAdamW, lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1),
    "apollo": functools.partial(ApolloAdamW, lr=1e-2, rank=4, update_proj_gap=2),
}


def _model(dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 16)).to(device, dtype)


def _groups(model: nn.Module) -> list[dict]:
    """Weight decay on the matrices, none on the norm and the biases."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _train(make, dtype: torch.dtype, steps: int, resume_at: int | None, device: str = "cpu",
           through_dcp: bool = False) -> list[torch.Tensor]:
    """`steps` steps under a decaying rate; at `resume_at`, everything saved through torch.save and rebuilt (in
    Lightning's order: optimizer and scheduler built, then their states loaded); `through_dcp`: the optimizer's
    state as torch.distributed.checkpoint saves it (the sharded strategies' checkpoints: parameters' state and
    groups, nothing else of the optimizer's). (`device`: the kernels' paths on a GPU run through it too.)"""
    def build(model):
        optimizer = make(_groups(model))
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    model = _model(dtype, device)
    optimizer, scheduler = build(model)
    for step in range(steps):
        if step == resume_at:
            buffer = io.BytesIO()
            optimizer_state = get_optimizer_state_dict(model, optimizer) if through_dcp else optimizer.state_dict()
            torch.save({"model": model.state_dict(), "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model = _model(dtype, device)
            model.load_state_dict(saved["model"])
            optimizer, scheduler = build(model)
            if through_dcp:
                set_optimizer_state_dict(model, optimizer, saved["optimizer"])
            else:
                optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(device, dtype)
        model(inputs).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resumed_optimizer_follows_the_uninterrupted_run_bit_for_bit(name, dtype):
    uninterrupted = _train(OPTIMIZERS[name], dtype, steps=6, resume_at=None)
    resumed = _train(OPTIMIZERS[name], dtype, steps=6, resume_at=3)  # apollo redraws its projection at step 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_a_low_rank_optimizer_resumed_from_a_sharded_checkpoints_state_follows_bit_for_bit(name):
    """Apollo's next projections came from a generator of its own, which torch.distributed.checkpoint (the
    pipeline strategy's checkpoints) does not save: a resumed run drew others from step 4 on."""
    uninterrupted = _train(OPTIMIZERS[name], torch.float32, steps=6, resume_at=None)
    resumed = _train(OPTIMIZERS[name], torch.float32, steps=6, resume_at=3, through_dcp=True)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_apollo_draws_other_projections_for_other_seeds_parameters_and_steps():
    grad = torch.randn(12, 16)
    optimizer = ApolloAdamW([nn.Parameter(torch.zeros(12, 16))], rank=4)
    draws = [optimizer.new_projection(grad, 4, True, (place, step)) for place in (0, 1) for step in (0, 200)]
    optimizer.seed = 1
    draws.append(optimizer.new_projection(grad, 4, True, (0, 0)))
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    optimizer.seed = 0
    assert torch.equal(optimizer.new_projection(grad, 4, True, (0, 0)), draws[0])


def _stepped(make, shapes: list[tuple[int, ...]]) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("saved_by, loaded_by, found", [
    ("adamw_sr", "adafactor", "holds ['exp_avg', 'exp_avg_sq', 'step']"),
    ("adafactor", "compiled_adamw", "holds ['col_var', 'exp_avg', 'row_var', 'step']"),
    ("compiled_adamw", "galore", "holds ['exp_avg', 'exp_avg_sq', 'step']"),
    ("galore", "apollo", "holds ['exp_avg', 'exp_avg_sq', 'projection', 'step']"),
    ("apollo", "adamw_sr", "holds ['exp_avg', 'exp_avg_sq', 'projection', 'step', 'update_norm']"),
])
def test_state_of_another_optimizer_is_refused_naming_what_it_holds(saved_by, loaded_by, found):
    _, saving = _stepped(OPTIMIZERS[saved_by], [(16, 8), (8,)])  # 16 x 8: low-rank at rank 4
    _, loading = _stepped(OPTIMIZERS[loaded_by], [(16, 8), (8,)])
    with pytest.raises(ValueError, match="saved by another optimizer") as caught:
        loading.load_state_dict(saving.state_dict())
    assert found in str(caught.value) and "parameter 0 (shape [16, 8])" in str(caught.value)


@pytest.mark.parametrize("name", ["adamw_sr", "adafactor", "compiled_adamw", "triton_adamw_sr", "galore", "apollo"])
def test_state_saved_for_parameters_of_other_shapes_is_refused(name):
    # galore and apollo used to load it silently and restart the moments of the mismatched parameter
    _, saving = _stepped(OPTIMIZERS[name], [(16, 8), (8,)])
    _, loading = _stepped(OPTIMIZERS[name], [(12, 8), (8,)])
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \[12, 8\]\) has .* of shape \[16.*for other parameters"):
        loading.load_state_dict(saving.state_dict())


def test_state_saved_for_other_param_groups_is_refused_naming_both():
    _, saving = _stepped(OPTIMIZERS["adafactor"], [(8, 4), (4,)])
    params = [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))]
    loading = OPTIMIZERS["adafactor"]([{"params": params[:1]}, {"params": params[1:]}])
    with pytest.raises(ValueError, match=r"param groups of \[2\] parameters, this optimizer \[1, 1\]"):
        loading.load_state_dict(saving.state_dict())


def test_adamw_sr_continues_from_torch_adamw_state():
    """The same moments: optimizer=adamw (TritonAdamW, torch's state) can be followed by optimizer=adamw_sr."""
    torch_params, torch_adamw = _stepped(functools.partial(torch.optim.AdamW, lr=1e-2), [(8, 4), (4,)])
    params = [nn.Parameter(p.detach().clone()) for p in torch_params]
    ours = AdamW(params, lr=1e-2, stochastic_rounding=False)
    ours.load_state_dict(copy.deepcopy(torch_adamw.state_dict()))  # as from a checkpoint: no shared moments
    for theirs, mine in zip(torch_params, params):
        theirs.grad = torch.full_like(theirs, 0.5)
        mine.grad = theirs.grad.clone()
    torch_adamw.step()
    ours.step()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(torch_params, params))


def test_in_backward_refuses_the_state_of_an_optimizer_stepping_after_backward():
    model = nn.Linear(4, 4)
    in_backward = optimizer_in_backward(model, functools.partial(torch.optim.AdamW, lr=1e-2))
    with pytest.raises(ValueError, match="saved by an optimizer that steps after backward"):
        in_backward.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


# Gradient accumulation in CausalLMModule


class _Outputs(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _one_step(accumulate: int, batches: int | None = None, outputs: _Outputs | None = None
              ) -> tuple[list[torch.Tensor], float]:
    """The parameters after one SGD step (lr 1: the step is the gradient) over the padded batch split into
    `batches` (default `accumulate`) accumulated ones, and the train/loss the module logged."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model()
    batch = padded_batch()
    batches = batches or accumulate
    rows = 4 // batches
    data = [{key: value[i * rows:(i + 1) * rows] for key, value in batch.items()} for i in range(batches)]
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[outputs] if outputs else None)
    trainer.fit(module, DataLoader(data, batch_size=None))
    return [p.detach() for p in model.parameters()], float(trainer.callback_metrics["train/loss"])


def test_accumulated_batches_step_as_one_batch_of_their_tokens():
    whole, whole_loss = _one_step(accumulate=1)
    outputs = _Outputs()
    accumulated, accumulated_loss = _one_step(accumulate=2, outputs=outputs)
    torch.manual_seed(0)
    module, batch = CausalLMModule(tiny_model()), padded_batch()
    token_mean = module._loss(batch).item()
    halves = [module._loss({key: value[rows] for key, value in batch.items()}).item()
              for rows in (slice(0, 2), slice(2, 4))]
    assert whole_loss == pytest.approx(token_mean, rel=1e-6)
    assert accumulated_loss == pytest.approx(token_mean, rel=1e-6)  # the window's token mean, not the last batch's
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(whole, accumulated))
    # what callbacks read stays each batch's own loss (divided by accumulate_grad_batches, as Lightning does)
    assert outputs.losses == pytest.approx([loss / 2 for loss in halves], rel=1e-6)


def test_a_short_last_window_of_an_epoch_takes_a_whole_step():
    """One batch left for a window of 4 at the epoch's end: Lightning divided its loss by 4 all the same."""
    whole, _ = _one_step(accumulate=1)
    short, _ = _one_step(accumulate=4, batches=1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(whole, short))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_ranks_of_unequal_tokens_step_as_one_process_on_all_their_rows(tmp_path, accumulate):
    """Rank 0's rows are mostly padding: DDP's mean of the two ranks' batch means would weigh its 4 targets as
    much as rank 1's 14. The step is the one process's on the whole batch, on both ranks alike."""
    whole, _ = _one_step(accumulate=1)
    wait_all(start_ranks([str(HELPERS / "ddp_token_mean.py"), str(tmp_path), "--accumulate", str(accumulate)], 2))
    ranks = [torch.load(tmp_path / f"params-rank{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(whole, ranks[0]))


def test_in_backward_optimizer_refuses_fp16_loss_scaling():
    """Its steps would take the scaled gradients (x65536), and no overflowed step would be skipped."""
    module = CausalLMModule(tiny_model(), optimizer=functools.partial(
        optimizer_in_backward, optimizer_factory=functools.partial(torch.optim.SGD, lr=1.0)))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    with pytest.raises(UserError, match="precision=16-mixed: .* before Lightning could unscale its gradient"):
        trainer.fit(module, DataLoader([padded_batch()], batch_size=None))
