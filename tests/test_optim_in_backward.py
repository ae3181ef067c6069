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
@pytest.mark.parametrize("bucket_size, buckets", [(None, 4), (30, 2)], ids=["per-parameter", "buckets"])
def test_gives_the_same_parameters_as_an_ordinary_step(factory, overlap, bucket_size, buckets):
    plain, hooked = make_model(), make_model()
    opt = factory(plain.parameters())
    in_bwd = optimizer_in_backward(hooked, factory, overlap=overlap, bucket_size=bucket_size)
    for batch in batches():
        opt.zero_grad()
        loss_of(plain, batch).backward()
        opt.step()
        loss_of(hooked, batch).backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b)
    assert len(in_bwd.optimizers) == 4 and len(in_bwd.buckets) == buckets


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


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps and the parameters it was built for."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("bucket_size, sizes", [(None, [48, 8, 24, 3]), (1, [3, 24, 8, 48]), (30, [35, 48]),
                                                (10**9, [83])])
def test_buckets_hold_at_least_their_size_in_reverse_order_and_step_once_per_pass(bucket_size, sizes):
    model = make_model()
    opt = optimizer_in_backward(model, partial(CountingSGD, lr=0.1), bucket_size=bucket_size)
    # one parameter each, or buckets in backward's order (last layer first)
    assert [sum(p.numel() for p in bucket) for bucket in opt.buckets] == sizes
    for batch in batches(2):
        loss_of(model, batch).backward()
    assert [opt.optimizers[bucket[0]].steps for bucket in opt.buckets] == [2] * len(sizes)
    assert all(p.grad is None for p in model.parameters())


def test_a_bucket_short_of_a_gradient_steps_at_the_end_of_the_pass():
    """A parameter that gets no gradient (unused in this forward) does not hold its bucket back forever."""
    model = make_model()
    unused = nn.Parameter(torch.ones(4))
    model.register_parameter("unused", unused)
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizer_in_backward(model, partial(CountingSGD, lr=0.1), bucket_size=10**9)
    loss_of(model, batches(1)[0]).backward()
    assert opt.optimizers[unused].steps == 1
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert changed == [False, True, True, True, True]  # the unused parameter (first): no gradient, no change
    assert all(p.grad is None for p in model.parameters())


def test_a_pass_that_raised_leaves_no_gradient_in_its_unfinished_bucket():
    """The bucket that a failed pass filled in part is emptied when the next pass starts: the next step is that
    of the next batch alone, not of both."""
    plain, hooked = make_model(), make_model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    optimizer_in_backward(hooked, partial(torch.optim.SGD, lr=0.1), bucket_size=10**9)
    first, second = batches(2)

    def fail(grad):
        raise RuntimeError("stop here")

    x, y = first
    hidden = hooked[0](x)
    hidden.register_hook(fail)  # reached after the last layer's gradients, before the first layer's
    with pytest.raises(RuntimeError, match="stop here"):
        nn.functional.mse_loss(hooked[2](hooked[1](hidden)), y).backward()
    assert hooked[2].weight.grad is not None  # held by the unfinished bucket
    loss_of(hooked, second).backward()
    loss_of(plain, second).backward()
    opt.step()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b)


def test_bucketed_state_dict_round_trips_and_a_different_bucketing_is_named():
    model = make_model()
    factory = partial(torch.optim.AdamW, lr=1e-2)
    opt = optimizer_in_backward(model, factory, bucket_size=30)
    loss_of(model, batches(1)[0]).backward()
    state = copy.deepcopy(opt.state_dict())
    other_model = copy.deepcopy(model)
    other = optimizer_in_backward(other_model, factory, bucket_size=30)
    other.load_state_dict(state)
    for batch in batches(2, seed=3):
        loss_of(model, batch).backward()
        loss_of(other_model, batch).backward()
    for a, b in zip(model.parameters(), other_model.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"saved stepping bucket_size=30, and this optimizer steps one parameter "
                                         r"each: set bucket_size to the saved one"):
        optimizer_in_backward(copy.deepcopy(model), factory).load_state_dict(state)


@pytest.mark.parametrize("bucket_size", [0, -5, 2.5, True, "64"])
def test_a_bucket_size_that_is_not_a_positive_integer_is_named(bucket_size):
    with pytest.raises(ValueError, match=r"bucket_size is the elements each optimizer steps at least"):
        optimizer_in_backward(make_model(), partial(torch.optim.SGD, lr=0.1), bucket_size=bucket_size)


def test_lr_scheduler_drives_every_bucket_optimizer():
    model = make_model()
    opt = optimizer_in_backward(model, partial(torch.optim.SGD, lr=1.0), bucket_size=30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
