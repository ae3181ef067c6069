"""forgather.optim.AdamW on CPU: torch's AdamW math, and bf16 weights that keep small updates."""

import copy
import functools

import pytest
import torch

from forgather.optim import AdamW
from helpers.weight_movement import movement, share_kept

torch.set_num_threads(1)


def make_params(dtype=torch.float32, seed=0, shapes=((16, 24), (24,))):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 0.02).to(dtype).requires_grad_() for shape in shapes]


def run_steps(params, optimizer, steps=5, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return params


@pytest.mark.parametrize("options", [{}, {"lr": 3e-2, "weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6}])
def test_fp32_steps_equal_torch_adamw(options):
    ours, theirs = make_params(), make_params()
    run_steps(ours, AdamW(ours, **options))
    run_steps(theirs, torch.optim.AdamW(theirs, **options))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_scheduler_changes_the_rate_every_step():
    ours, theirs = make_params(), make_params()
    opt_a, opt_b = AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    run_steps(ours, opt_a, scheduler=torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5))
    run_steps(theirs, opt_b, scheduler=torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_weights_keep_updates_smaller_than_half_a_bf16_step():
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(64, 96, generator=gen) * 0.05
    grads = [torch.randn(64, 96, generator=gen) for _ in range(30)]
    runs = {
        name: movement(init, grads, dtype, functools.partial(AdamW, lr=1e-5, weight_decay=0.0,
                                                              stochastic_rounding=rounding))
        for name, dtype, rounding in (("fp32", torch.float32, True), ("sr", torch.bfloat16, True),
                                      ("nearest", torch.bfloat16, False))
    }

    def kept(name):
        return share_kept(runs[name], runs["fp32"])

    assert kept("nearest") < 0.3
    assert 0.9 < kept("sr") < 1.1


def test_state_dict_round_trip_continues_identically():
    params = make_params(torch.bfloat16)
    optimizer = AdamW(params, lr=1e-3, state_dtype=torch.float32)
    run_steps(params, optimizer, steps=3)
    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = AdamW(copies, lr=1e-3, state_dtype=torch.float32)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as through a checkpoint file
    assert all(s["exp_avg"].dtype == torch.float32 for s in resumed.state.values())
    run_steps(params, optimizer, steps=3, seed=5)
    run_steps(copies, resumed, steps=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(params, copies))


def test_invalid_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        AdamW(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(make_params(), lr=-1.0)


def test_fsdp2_sharded_parameters_step_like_unsharded_ones(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    helper = Path(__file__).parent / "helpers" / "fsdp2_adamw.py"
    done = subprocess.run([sys.executable, str(helper), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 2
    for result in results:
        assert result["difference"] < 1e-6
        assert result["bf16_moved"]


def test_a_pickled_adamw_keeps_its_state_dtype():
    import pickle

    params = [torch.randn(6, 4, dtype=torch.bfloat16).requires_grad_()]
    clone = pickle.loads(pickle.dumps(AdamW(params, lr=1e-3, state_dtype=torch.float32)))
    (param,) = clone.param_groups[0]["params"]
    param.grad = torch.ones_like(param)
    clone.step()
    assert clone.state[param]["exp_avg"].dtype == torch.float32
