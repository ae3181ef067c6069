"""forgather.optim.CompiledAdamW on a CPU: torch's AdamW (its foreach path) behind Lightning's closure, with a
schedule, through a state dict, and the compiled step's arithmetic (tests/gpu/test_optim_gpu.py: on CUDA)."""

import pytest
import torch

from forgather.optim import CompiledAdamW
from helpers.closure_steps import make_params, run_steps

OPTIONS = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def test_steps_with_a_closure_and_a_schedule_equal_torch_adamw():
    ours, theirs = make_params(), make_params()
    mine = CompiledAdamW(ours, **OPTIONS)
    reference = torch.optim.AdamW(theirs, **OPTIONS)
    schedule = lambda step: 1.0 / (step + 1)  # noqa: E731
    run_steps(ours, mine, scheduler=torch.optim.lr_scheduler.LambdaLR(mine, schedule))
    run_steps(theirs, reference, scheduler=torch.optim.lr_scheduler.LambdaLR(reference, schedule))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mine.param_groups[0]["lr"] == pytest.approx(OPTIONS["lr"] / 6)


def test_a_state_dict_continues_the_run_and_loads_into_torch_adamw():
    whole, cut = make_params(), make_params()
    run_steps(whole, CompiledAdamW(whole, **OPTIONS), steps=6)
    first = CompiledAdamW(cut, **OPTIONS)
    run_steps(cut, first, steps=3)
    state = first.state_dict()
    second = CompiledAdamW(cut, **OPTIONS)
    second.load_state_dict(state)
    run_steps(cut, second, steps=3, seed=2)
    torch.optim.AdamW(make_params(), **OPTIONS).load_state_dict(state)  # the same state dict as AdamW's
    rerun = make_params()
    optimizer = CompiledAdamW(rerun, **OPTIONS)
    run_steps(rerun, optimizer, steps=3)
    run_steps(rerun, optimizer, steps=3, seed=2)
    for a, b in zip(cut, rerun):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_parameters_or_several_devices_are_errors():
    with pytest.raises(ValueError, match="no parameters"):
        CompiledAdamW([], lr=1e-3)
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="one device; got cpu and meta"):
        CompiledAdamW([*make_params(), meta], lr=1e-3)


@pytest.mark.slow
def test_the_compiled_step_computes_the_eager_one():
    """compile=True on a CPU (what CUDA runs by default, there with the rate in a device tensor): ~10 s."""
    eager, compiled = make_params(), make_params()
    run_steps(eager, CompiledAdamW(eager, **OPTIONS))
    optimizer = CompiledAdamW(compiled, compile=True, **OPTIONS)
    run_steps(compiled, optimizer)
    assert optimizer._compiled is not None
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_where_the_step_is_captured_every_groups_rate_is_a_device_tensor(monkeypatch):
    """On CUDA (here: the CPU made a capturable device, the step not run) each param group's rate, given as a
    float or not given, and that of a group added later, is a float32 tensor on the parameters' device: a
    float rate would make the compiled step compile again at every new value."""
    from forgather.optim import compiled

    monkeypatch.setattr(compiled, "CAPTURABLE_DEVICES", ("cpu",))
    first, second, third = make_params(seed=1), make_params(seed=2), make_params(seed=3)
    optimizer = CompiledAdamW([{"params": first}, {"params": second, "lr": 5e-3}], lr=1e-3)
    optimizer.add_param_group({"params": third, "lr": 2e-3})
    assert optimizer.defaults["capturable"] and optimizer._compile
    rates = [group["lr"] for group in optimizer.param_groups]
    assert all(isinstance(r, torch.Tensor) and r.dtype == torch.float32 and r.device.type == "cpu" for r in rates)
    assert [r.item() for r in rates] == pytest.approx([1e-3, 5e-3, 2e-3])
    state = optimizer.state_dict()
    state["param_groups"][1]["lr"] = 7e-3  # a checkpoint that kept a float
    optimizer.load_state_dict(state)
    assert isinstance(optimizer.param_groups[1]["lr"], torch.Tensor)
    assert optimizer.param_groups[1]["lr"].item() == pytest.approx(7e-3)
