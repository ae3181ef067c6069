"""optimizer_in_backward on CPU: same parameters as an ordinary step, gradients freed, loop-facing API."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from forgather.optim import Adafactor, optimizer_in_backward

torch.set_num_threads(1)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize(
    "factory", [partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), partial(Adafactor, lr=1e-2, beta1=0.9)]
)
@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])  # overlap: CUDA only, else inline
def test_gives_the_same_parameters_as_an_ordinary_step(factory, overlap):
    plain, hooked = make_model(), make_model()
    opt = factory(plain.parameters())
    in_bwd = optimizer_in_backward(hooked, factory, overlap=overlap)
    for batch in batches():
        opt.zero_grad()
        loss_of(plain, batch).backward()
        opt.step()
        loss_of(hooked, batch).backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b)
    assert len(in_bwd.optimizers) == 4


def test_gradients_are_freed_after_backward():
    model = make_model()
    optimizer_in_backward(model, partial(torch.optim.SGD, lr=0.1))
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is None for p in model.parameters())


def test_step_runs_the_closure_like_lightning_does():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizer_in_backward(model, partial(torch.optim.SGD, lr=0.1))
    batch = batches(1)[0]

    def closure():
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_scheduler_drives_every_per_parameter_optimizer():
    model = make_model()
    opt = optimizer_in_backward(model, partial(torch.optim.SGD, lr=1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    sched.step()
    assert [g["lr"] for o in opt.optimizers.values() for g in o.param_groups] == [0.5] * 4


def test_state_dict_round_trip_restores_every_optimizer():
    model = make_model()
    factory = partial(torch.optim.AdamW, lr=1e-2)
    opt = optimizer_in_backward(model, factory)
    loss_of(model, batches(1)[0]).backward()
    other_model = copy.deepcopy(model)
    other = optimizer_in_backward(other_model, factory)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for batch in batches(2, seed=3):
        loss_of(model, batch).backward()
        loss_of(other_model, batch).backward()
    for a, b in zip(model.parameters(), other_model.parameters()):
        torch.testing.assert_close(a, b)


def test_frozen_parameters_get_no_optimizer():
    model = make_model()
    model[0].weight.requires_grad_(False)
    opt = optimizer_in_backward(model, partial(torch.optim.SGD, lr=0.1))
    assert model[0].weight not in opt.optimizers and len(opt.optimizers) == 3


def test_remove_hooks_leaves_gradients_in_place():
    model = make_model()
    opt = optimizer_in_backward(model, partial(torch.optim.SGD, lr=0.1))
    opt.remove_hooks()
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
