"""forgather.optim.Adafactor (the reference) on CPU, against torch.optim.Adafactor and the paper's rules."""

import copy
import functools

import pytest
import torch

from forgather.optim import Adafactor, TritonAdafactor
from forgather.optim.adafactor import step_scalars
from helpers.weight_movement import movement, share_kept

torch.set_num_threads(1)
FP32_EPS = torch.finfo(torch.float32).eps


def make_params(shapes=((8, 12), (12,), (3, 5, 7)), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def clones(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run_steps(params, optimizer, steps=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (step + 1)).to(p.dtype)
        optimizer.step()
    return params


def rms(x):
    return x.float().square().mean().sqrt().item()


def test_matches_torch_adafactor_without_first_moment():
    params = make_params()
    a, b = clones(params), clones(params)
    run_steps(a, Adafactor(a, lr=0.05, weight_decay=0.1))
    run_steps(b, torch.optim.Adafactor(b, lr=0.05, weight_decay=0.1, eps=(FP32_EPS, 1e-3)))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_factored_state_is_one_row_and_one_column_vector():
    (w,) = make_params(shapes=((16, 24),))
    opt = Adafactor([w])
    run_steps([w], opt, steps=1)
    state = opt.state[w]
    assert state["row_var"].shape == (16,) and state["col_var"].shape == (24,)
    assert "exp_avg" not in state


def test_update_clipping_caps_the_update_rms_at_d():
    (w,) = make_params(shapes=((16, 24),))
    before = w.detach().clone()
    d, lr = 0.25, 0.1
    run_steps([w], Adafactor([w], lr=lr, d=d, relative_step=False, scale_parameter=False), steps=1)
    # Step 1: beta2_t = 0, so V = G^2 factored and RMS(U) is about 1 > d: the step is lr * d in RMS.
    assert rms(w.detach() - before) == pytest.approx(lr * d, rel=1e-4)


def test_relative_step_is_min_of_lr_and_inverse_sqrt_step_and_beta2_follows_the_decay():
    group = Adafactor(make_params(), lr=0.3).param_groups[0]
    assert [step_scalars(group, t)["rho"] for t in (1, 4, 100)] == pytest.approx([0.3, 0.3, 0.1])
    assert step_scalars(group, 32)["one_minus_beta2"] == pytest.approx(32**-0.8)
    group["relative_step"] = False
    assert step_scalars(group, 100)["rho"] == pytest.approx(0.3)


def test_beta1_zero_equals_no_first_moment():
    params = make_params()
    a, b = clones(params), clones(params)
    run_steps(a, Adafactor(a, beta1=0.0))
    run_steps(b, Adafactor(b, beta1=None))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_first_moment_changes_the_trajectory_and_is_kept_in_state():
    params = make_params()
    a, b = clones(params), clones(params)
    opt = Adafactor(a, beta1=0.9)
    run_steps(a, opt)
    run_steps(b, Adafactor(b))
    assert all("exp_avg" in opt.state[p] for p in a)
    assert not torch.allclose(a[0], b[0])


def test_bf16_parameters_stay_bf16_with_fp32_state_and_track_fp32_run():
    params = make_params(shapes=((16, 24), (24,)))
    a = clones([p.bfloat16() for p in params])
    b = clones(params)
    opt = Adafactor(a, lr=0.05)
    run_steps(a, opt)
    run_steps(b, Adafactor(b, lr=0.05))
    assert all(p.dtype == torch.bfloat16 for p in a)
    assert opt.state[a[0]]["row_var"].dtype == torch.float32
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y, rtol=2e-2, atol=2e-2)


def test_maximize_steps_against_the_gradient_direction_of_minimize():
    (w,) = make_params(shapes=((5, 7),))
    up, down = clones([w])[0], clones([w])[0]
    run_steps([up], Adafactor([up], maximize=True), steps=1)
    run_steps([down], Adafactor([down]), steps=1)
    torch.testing.assert_close(up - w, -(down - w))


def test_state_dict_round_trip_continues_identically():
    params = make_params()
    a, b = clones(params), clones(params)
    opt_a = Adafactor(a, beta1=0.9)
    run_steps(a, opt_a, steps=2)
    opt_b = Adafactor(b, beta1=0.9)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    run_steps(a, opt_a, steps=2, seed=5)
    run_steps(b, opt_b, steps=2, seed=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_loaded_state_of_bf16_parameters_stays_fp32():
    (w,) = make_params(shapes=((6, 8),), dtype=torch.bfloat16)
    opt = Adafactor([w])
    run_steps([w], opt, steps=1)
    other = Adafactor([w])
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("row_var", "col_var"):
        assert other.state[w][key].dtype == torch.float32
        assert torch.equal(other.state[w][key], opt.state[w][key])  # not rounded through bf16 on the way


def test_invalid_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="beta1"):
        Adafactor(make_params(), beta1=1.5)


def test_triton_adafactor_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TritonAdafactor(make_params())


def test_importing_forgather_optim_imports_neither_torch_nor_triton():
    import subprocess
    import sys

    code = "import sys, forgather.optim; print(','.join(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above x in magnitude (truncation, and truncation plus one step)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    down = (bits & 0xFFFF0000).to(torch.int32).view(torch.float32)
    up = ((bits & 0xFFFF0000) + 0x10000).to(torch.int32).view(torch.float32)
    return down, up


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    from forgather.optim.rounding import stochastic_round_to_bf16

    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0)) * 0.02
    down, up = _bf16_neighbours(x)
    rounded = torch.stack([stochastic_round_to_bf16(x, seed).float() for seed in range(200)])
    assert ((rounded == down) | (rounded == up)).all()
    # P(up) = the discarded fraction of the step: the mean over seeds approaches x, not the nearest value.
    fraction_up = (rounded == up).float().mean(0)
    expected = (x - down) / (up - down)
    assert (fraction_up - expected).abs().mean() < 0.03
    assert (rounded.mean(0) - x).abs().mean() < 0.1 * (x.bfloat16().float() - x).abs().mean()
    exact = x.bfloat16().float()  # values bf16 holds already are left as they are
    assert torch.equal(stochastic_round_to_bf16(exact, 7).float(), exact)


@pytest.mark.parametrize("shape", [(64, 96), (500,)])
def test_bf16_adafactor_keeps_updates_smaller_than_half_a_bf16_step(shape):
    # A fine-tuning rate: every update is ~1e-4 of the weight, far below bf16's resolution (2^-8).
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(shape, generator=gen) * 0.02
    grads = [torch.randn(shape, generator=gen)] * 30
    runs = {
        name: movement(init, grads, dtype, functools.partial(Adafactor, lr=1e-4, stochastic_rounding=rounding))
        for name, dtype, rounding in (("fp32", torch.float32, True), ("sr", torch.bfloat16, True),
                                      ("nearest", torch.bfloat16, False))
    }

    def kept(name):
        return share_kept(runs[name], runs["fp32"])

    assert kept("nearest") < 0.3  # rounded to nearest, most updates vanish (all but those of tiny weights)
    assert 0.9 < kept("sr") < 1.1  # stochastic rounding keeps them in expectation
    assert torch.corrcoef(torch.stack([runs["sr"].flatten(), runs["fp32"].flatten()]))[0, 1] > 0.5


def test_stochastic_rounding_is_reproducible_and_follows_the_seed():
    def run(seed):
        params = make_params(dtype=torch.bfloat16)
        return run_steps(params, Adafactor(params, lr=1e-3, seed=seed))

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("options", [{}, {"beta1": 0.9, "scale_parameter": False}])
def test_a_step_reads_no_tensor_on_the_host_but_its_step_counters(options):
    """On a GPU every host read of a device tensor waits for the queued kernels: the update's step size and
    clipping stay on the device (the step counters are host tensors by design)."""
    from torch.overrides import TorchFunctionMode

    from test_step_syncs import READS_ON_HOST

    params = make_params()
    optimizer = Adafactor(params, **options)
    run_steps(params, optimizer, steps=1)
    counters = {id(optimizer.state[p]["step"]) for p in params}
    reads = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in READS_ON_HOST and not (args and id(args[0]) in counters):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    for p in params:
        p.grad = torch.ones_like(p)
    with Reads():
        optimizer.step()
    assert reads == []


@pytest.mark.parametrize("dtype, options", [(torch.float32, {}), (torch.bfloat16, {"beta1": 0.9, "weight_decay": 0.1}),
                                            (torch.float32, {"maximize": True})])
def test_triton_adafactor_steps_a_models_vectors_as_one_stack(monkeypatch, dtype, options):
    """TritonAdafactor's 1-D parameters of one shape (a model's norm weights) take one stacked update a step,
    which gives the reference's parameters and states bit for bit here (on the CPU, as under the interpreter:
    no 2-D parameter, so no kernel runs); a vector of another shape steps alone."""
    from forgather.optim import adafactor, triton_adafactor

    monkeypatch.setattr(triton_adafactor, "interpreting", lambda: True)
    monkeypatch.setattr(triton_adafactor, "_load_kernels", lambda: type("K", (), {
        "BLOCK_N": 16, "BLOCK_M": 512, "ROWS_PER_PROGRAM": 32, "NUM_WARPS": 4}))
    stacked = []
    original = adafactor.stacked_reference_update
    monkeypatch.setattr(triton_adafactor, "stacked_reference_update",
                        lambda params, *rest: (stacked.append(len(params)), original(params, *rest)))
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=gen) * 0.1 + 1 for shape in [(48,)] * 4 + [(30,)]]
    ours = [p.clone().to(dtype).requires_grad_() for p in init]
    theirs = [p.clone().to(dtype).requires_grad_() for p in init]
    mine, reference = TritonAdafactor(ours, **options), Adafactor(theirs, **options)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen).to(dtype)
            b.grad = a.grad.clone()
        mine.step()
        reference.step()
    assert stacked == [4, 4, 4]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        for key, value in reference.state[b].items():
            assert torch.equal(mine.state[a][key], value), key


def test_a_pickled_triton_adafactor_keeps_its_tiling_and_steps_on(monkeypatch):
    import pickle

    from forgather.optim import triton_adafactor

    monkeypatch.setattr(triton_adafactor, "interpreting", lambda: True)
    monkeypatch.setattr(triton_adafactor, "_load_kernels", lambda: type("K", (), {
        "BLOCK_N": 16, "BLOCK_M": 512, "ROWS_PER_PROGRAM": 32, "NUM_WARPS": 4}))
    params = [torch.randn(48).requires_grad_() for _ in range(3)]  # vectors: the stacked path, no kernel
    optimizer = TritonAdafactor(params, tile=(8, 256, 16), num_warps=8, serpentine=False)
    copy = pickle.loads(pickle.dumps(optimizer))
    assert (copy._tiles, copy._num_warps, copy._serpentine) == (
        dict(BLOCK_N=8, BLOCK_M=256, ROWS_PER_PROGRAM=16), 8, False)
    for p in copy.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    copy.step()
    assert all(copy.state[p]["step"].item() == 1 for p in copy.param_groups[0]["params"])
