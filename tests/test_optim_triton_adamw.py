"""forgather.optim.TritonAdamW on a CPU: torch's AdamW where the kernel does not run; the kernel's arithmetic
(reference_step) against torch's fused AdamW; its work list; and the host side of a kernel step, with the
kernel replaced by a torch emulation of its contract (the addresses, sizes, work list and scalars it is given).
The kernel itself: scripts/interpret_adamw.py (Triton's interpreter) and tests/gpu/test_optim_gpu.py."""

import random

import pytest
import torch

from forgather.optim import TritonAdamW
from forgather.optim import triton_adamw
from forgather.optim.rounding import stochastic_round_to_bf16
from forgather.optim.triton_adamw import plan_programs, reference_step
from helpers import closure_steps
from helpers.closure_steps import run_steps

OPTIONS = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
SHAPES = ((16, 24), (24,), (7, 3), (0,))  # an empty tensor among them


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES):
    return closure_steps.make_params(seed, dtype, shapes)


def test_on_a_cpu_it_is_torch_adamw_bit_for_bit_with_a_closure_and_a_schedule():
    ours, theirs = make_params(), make_params()
    mine, reference = TritonAdamW(ours, **OPTIONS), torch.optim.AdamW(theirs, **OPTIONS)
    schedule = lambda step: 1.0 / (step + 1)  # noqa: E731
    run_steps(ours, mine, scheduler=torch.optim.lr_scheduler.LambdaLR(mine, schedule))
    run_steps(theirs, reference, scheduler=torch.optim.lr_scheduler.LambdaLR(reference, schedule))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mine._kernels is None  # the CPU never imported the kernel


def test_a_state_dict_moves_between_it_and_torch_adamw_and_a_device_rate_becomes_a_float():
    whole, cut = make_params(), make_params()
    run_steps(whole, torch.optim.AdamW(whole, **OPTIONS), steps=6)
    first = torch.optim.AdamW(cut, **OPTIONS)
    run_steps(cut, first, steps=3)
    state = first.state_dict()
    state["param_groups"][0]["lr"] = torch.tensor(OPTIONS["lr"])  # as CompiledAdamW keeps it
    second = TritonAdamW(cut, **OPTIONS)
    second.load_state_dict(state)
    assert isinstance(second.param_groups[0]["lr"], float)
    run_steps(cut, second, steps=3, seed=2)
    torch.optim.AdamW(make_params(), **OPTIONS).load_state_dict(second.state_dict())
    rerun = make_params()
    optimizer = torch.optim.AdamW(rerun, **OPTIONS)
    run_steps(rerun, optimizer, steps=3)
    run_steps(rerun, optimizer, steps=3, seed=2)
    for a, b in zip(cut, rerun):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_tensor_rate_is_refused_in_one_line():
    with pytest.raises(ValueError, match="rate and betas as floats.*optimizer=adamw_compiled"):
        TritonAdamW(make_params(), lr=torch.tensor(1e-3))


@pytest.mark.parametrize("dtype, steps, options, ulps", [
    (torch.float32, 5, OPTIONS, 2.0 ** -20),
    (torch.float32, 3, dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, maximize=True), 2.0 ** -20),
    (torch.bfloat16, 5, dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01), 2.0 ** -7),
])
def test_the_kernels_arithmetic_is_torch_fused_adamws(dtype, steps, options, ulps):
    """reference_step, which the kernel computes (scripts/interpret_adamw.py) and which steps what the kernel
    does not take, gives torch's fused AdamW's parameters and moments, within a few roundings of the largest
    value (torch's CPU kernel takes other vector paths, with fused multiply-adds, than its CUDA one)."""
    ours, theirs = make_params(dtype=dtype), make_params(dtype=dtype)
    fused = torch.optim.AdamW(theirs, fused=True, **options)
    states = [dict(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)) for p in ours]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(1, steps + 1):
            for p, q, state in zip(ours, theirs, states):
                q.grad = torch.randn(p.shape, generator=gen).to(dtype)
                reference_step(p, q.grad, state["exp_avg"], state["exp_avg_sq"], step=step,
                               beta1=options["betas"][0], beta2=options["betas"][1], lr=options["lr"],
                               eps=options["eps"], weight_decay=options["weight_decay"],
                               maximize=options.get("maximize", False))
            fused.step()
    for p, q, state in zip(ours, theirs, states):
        pairs = [(p, q)] + [(state[key], fused.state[q][key]) for key in ("exp_avg", "exp_avg_sq")]
        for mine, torchs in pairs:
            if torchs.numel():
                scale = torchs.float().abs().max().item()
                torch.testing.assert_close(mine, torchs, rtol=0, atol=2 * ulps * scale)


def test_the_work_list_covers_every_element_once():
    rng = random.Random(0)
    for block in (1, 7, 2048):
        numels = [rng.choice([0, 1, block - 1, block, block + 1, rng.randrange(1, 5 * block)]) for _ in range(9)]
        work = plan_programs(numels, block)
        assert work.dtype == torch.int32 and work.shape[0] == 2
        tensors, blocks = work.tolist()
        covered = [[0] * n for n in numels]
        for t, b in zip(tensors, blocks):
            for i in range(b * block, min((b + 1) * block, numels[t])):
                covered[t][i] += 1
            assert b * block < numels[t]  # no program without work
        assert all(c == [1] * n for c, n in zip(covered, numels))


class EmulatedKernel:
    """adamw_multi_tensor's contract in torch: each program finds its tensors through the address table it
    was given, among the live tensors by data_ptr, and steps its block with reference_step's arithmetic. A
    stale address, a wrong size or work list, or wrong scalars give other numbers."""

    BLOCK, NUM_WARPS = 8, 4

    def __init__(self, live=None):
        self.live, self.launches, self.scaled, self.aligned, self.measured = live, [], [], [], []

    def __getitem__(self, grid):
        def launch(addresses, numels, work, programs, tensors, grad_scale, norm_partials, seed, param0, grad0, state0,
                   lr_weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt,
                   eps, MAXIMIZE, HAS_GRAD_SCALE, HAS_NORM, STOCHASTIC_ROUNDING, ALIGNED, BLOCK, num_warps):
            assert grid == (programs,) and work.shape == (2, programs) and BLOCK == self.BLOCK
            # the dtypes' tensors are non-empty (Triton's launcher refuses an empty tensor's address 0)
            assert param0.numel() and grad0.numel() and state0.numel()
            table = addresses.view(4, tensors).tolist()
            by_address = {t.data_ptr(): t for t in (self.live or self.all_live)()}
            self.launches.append((tensors, programs, step_size))
            self.scaled.append(HAS_GRAD_SCALE)
            self.aligned.append(ALIGNED)
            self.measured.append(HAS_NORM)
            if HAS_NORM:
                assert norm_partials.shape == (programs,) and norm_partials.dtype == torch.float32
            if ALIGNED:  # the hint must be true: 16-byte addresses, sizes of 16 elements
                assert all(a % 16 == 0 for a in addresses.tolist()) and all(n % 16 == 0 for n in numels.tolist())
            for pid, (t, b) in enumerate(zip(*work.tolist())):
                p, g, m, v = (by_address[table[row][t]].view(-1) for row in range(4))
                assert p.numel() == numels[t].item()
                s = slice(b * BLOCK, (b + 1) * BLOCK)
                x, grad, first, second = (z[s].float() for z in (p, g, m, v))
                if HAS_NORM:  # the gradients as read, before clipping's factor
                    norm_partials[pid] = grad.square().sum()
                grad = grad * grad_scale if HAS_GRAD_SCALE else grad
                grad = -grad if MAXIMIZE else grad
                x = x - lr_weight_decay * x
                first = beta1 * first + one_minus_beta1 * grad
                second = beta2 * second + one_minus_beta2 * grad * grad
                x = x - step_size * first / (second.sqrt() / bias_correction2_sqrt + eps)
                if STOCHASTIC_ROUNDING:  # rounding.py's, the element's index in its tensor
                    indices = torch.arange(p.numel())[s]
                    x = stochastic_round_to_bf16(x, seed, indices)
                p[s], m[s], v[s] = x, first, second
        return launch

    @property
    def adamw_multi_tensor(self):
        return self

    def all_live(self):
        """The tensors of the optimizer that launched: what its kernel may be pointed at."""
        optimizer = self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = [t for state in optimizer.state.values() for t in state.values() if t.dim()]
        return [*params, *(p.grad for p in params if p.grad is not None), *states]


def emulate_the_kernel(monkeypatch, kernel=None):
    """TritonAdamW's CUDA path on CPU tensors, with EmulatedKernel for adamw_kernels."""
    kernel = kernel or EmulatedKernel()
    monkeypatch.setattr(triton_adamw, "interpreting", lambda: True)
    monkeypatch.setattr(triton_adamw, "_load_kernels", lambda: kernel)
    launch = TritonAdamW._launch

    def launching(optimizer, *args, **kwargs):
        kernel.optimizer = optimizer
        return launch(optimizer, *args, **kwargs)

    monkeypatch.setattr(TritonAdamW, "_launch", launching)
    return kernel


def test_a_kernel_step_passes_the_right_tensors_sizes_and_scalars(monkeypatch):
    """The host side of the CUDA path (here on CPU tensors, as under the interpreter): buckets by step count
    (a parameter without a gradient at some step lags, and gets its own bias correction), a non-contiguous
    parameter through reference_step, the address table rebuilt when a gradient moves; the parameters are
    torch's AdamW's within rounding."""
    shapes = ((0,), (16, 24), (24,), (7, 3), (19,))  # an empty tensor first in its bucket
    ours, theirs = make_params(shapes=shapes), make_params(shapes=shapes)
    odd = torch.randn(6, 5).t().detach().requires_grad_()  # non-contiguous: the reference path
    ours.append(odd)
    theirs.append(odd.detach().clone().requires_grad_())
    mine = TritonAdamW(ours, **OPTIONS)
    kernel = emulate_the_kernel(monkeypatch, EmulatedKernel(
        lambda: [*ours, *(p.grad for p in ours if p.grad is not None),
                 *(t for s in mine.state.values() for t in s.values() if t.dim())]))
    skip = lambda step, index: step == 1 and index == 4  # noqa: E731 - (19,) has no gradient at step 1
    reference = torch.optim.AdamW(theirs, **OPTIONS)
    run_steps(ours, mine, steps=4, skip=skip)
    run_steps(theirs, reference, steps=4, skip=skip)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # step 1: one launch for the five contiguous tensors; step 2: (19,) has no gradient, four; steps 3 and 4:
    # (19,) is a step behind, a launch of its own
    assert [n for n, _, _ in kernel.launches] == [5, 4, 4, 1, 4, 1]
    assert kernel.launches[2][2] != kernel.launches[3][2]  # the step sizes of counts 3 and 2
    assert [mine.state[p]["step"].item() for p in ours] == [4, 4, 4, 4, 3, 4]


def test_the_kernel_is_told_its_tensors_are_aligned_only_when_every_address_and_size_is(monkeypatch):
    """ALIGNED (vectorized loads and stores) where every tensor of the bucket starts on 16 bytes and holds a
    multiple of 16 elements; a bucket with one tensor of another size, or one a view starting mid-buffer, is
    stepped without the hint, and the emulated kernel checks the hint is true whenever it is given."""
    aligned = make_params(shapes=((32, 16), (48,), (0,)))
    buffer = torch.randn(65)
    offset = buffer[1:].view(4, 16).requires_grad_()  # 4 bytes past an aligned start
    odd_size = make_params(shapes=((32, 16), (40,)))
    flags = []
    for params in (aligned, aligned[:1] + [offset], odd_size):
        kernel = emulate_the_kernel(monkeypatch)
        run_steps(params, TritonAdamW(params, **OPTIONS), steps=2)
        flags.append(kernel.aligned)
    assert offset.data_ptr() % 16 and flags == [[True, True], [False, False], [False, False]]


def clipped_steps(params, optimizer, max_norm, steps=4, seed=1, clip=None):
    """Steps with clipping by global norm between backward and the update, as Lightning orders them."""
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]

        def closure():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norms.append(clip(params, max_norm))
            return torch.tensor(1.0)

        optimizer.step(closure)
    return norms


def torch_clip(params, max_norm):
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_clipping_is_torch_clip_grad_norm_off_the_kernel_and_folded_into_the_step_on_it(monkeypatch):
    """On a CPU clip_grad_norm_ is torch's (the gradients scaled in place, the same bits); where the kernel runs
    it only computes the factor, the gradients stay as they are, and the step scales each as it reads it: the
    parameters are those of torch's clipping and AdamW, within rounding."""
    max_norm = 0.5  # below the random gradients' norms: every step clips
    plain, theirs = make_params(), make_params()
    ours_cpu = TritonAdamW(plain, **OPTIONS)
    norms = clipped_steps(plain, ours_cpu, max_norm, clip=lambda ps, m: ours_cpu.clip_grad_norm_(m))
    reference_norms = clipped_steps(theirs, torch.optim.AdamW(theirs, **OPTIONS), max_norm, clip=torch_clip)
    assert torch.equal(torch.stack(norms), torch.stack(reference_norms)) and min(norms) > max_norm
    for a, b in zip(plain, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    kernel = emulate_the_kernel(monkeypatch)
    folded = make_params()
    mine = TritonAdamW(folded, **OPTIONS)
    seen = []

    def clip_and_look(params, m):
        before = [p.grad.clone() for p in params]
        norm = mine.clip_grad_norm_(m)
        seen.append(all(torch.equal(p.grad, g) for p, g in zip(params, before)))  # no pass over the gradients
        return norm

    folded_norms = clipped_steps(folded, mine, max_norm, clip=clip_and_look)
    assert all(seen) and kernel.scaled == [True] * 4
    torch.testing.assert_close(torch.stack(folded_norms), torch.stack(reference_norms), rtol=1e-6, atol=0)
    for a, b in zip(folded, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    mine.clip_grad_norm_(max_norm)
    mine.zero_grad()  # a step that does not follow drops the factor
    for p in folded:
        p.grad = torch.ones_like(p)
    mine.step()
    assert kernel.scaled[-1] is False


def test_a_requested_gradient_norm_comes_from_the_kernels_sums_and_the_clips_norm(monkeypatch):
    """request_grad_norm: the next step's kernel stores each program's sum of squares, and take_grad_norm gives
    get_total_norm's value (rounding aside) over every gradient, the reference path's included; once, and only
    after a request. A clipped step hands on the norm clip_grad_norm_ computed, without the kernel measuring."""
    shapes = ((16, 24), (24,), (7, 3), (19,))
    params = make_params(shapes=shapes)
    odd = torch.randn(6, 5).t().detach().requires_grad_()  # non-contiguous: the reference path
    params.append(odd)
    mine = TritonAdamW(params, **OPTIONS)
    kernel = emulate_the_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    norms = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).reshape(p.shape)
        expected = torch.nn.utils.get_total_norm([p.grad.clone() for p in params])
        if step != 1:
            mine.request_grad_norm()
        mine.step()
        got = mine.take_grad_norm()
        norms.append(got)
        if step != 1:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
            assert mine.take_grad_norm() is None  # once
    assert norms[1] is None and kernel.measured == [True, False, True]

    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).reshape(p.shape)
    clip_norm = mine.clip_grad_norm_(0.1)
    mine.request_grad_norm()
    mine.step()
    assert mine.take_grad_norm() is clip_norm and kernel.measured[-1] is False and kernel.scaled[-1] is True


def test_off_the_kernel_a_requested_norm_is_get_total_norms_before_the_update_and_clipping():
    params = make_params()
    mine = TritonAdamW(params, **OPTIONS)
    assert not mine.folds_grad_norm()  # no gradients yet; on a CPU never
    for p in params:
        p.grad = torch.randn_like(p)
    assert not mine.folds_grad_norm()
    expected = torch.nn.utils.get_total_norm([p.grad.clone() for p in params])
    mine.request_grad_norm()
    mine.step()
    assert torch.equal(mine.take_grad_norm(), expected)
    clip_norm = mine.clip_grad_norm_(1e-3)  # torch's clipping scales the gradients in place
    mine.request_grad_norm()
    mine.step()
    assert mine.take_grad_norm() is clip_norm and clip_norm > 1e-3


def test_a_lightning_run_folds_its_clipping_into_the_step_and_trains_as_torch_adamw(tmp_path, monkeypatch):
    """forgather.run with optimizer=adamw_triton and clipping by norm (CausalLMModule.configure_gradient_clipping
    hands it to the optimizer): every step's kernel scales the gradients, and the losses are those of torch's
    AdamW with Lightning's clipping, within rounding."""
    from test_run import run, run_dirs, train_losses

    common = ("+experiment=micro", "scheduler=constant", "max_steps=6", "gradient_clip_val=0.05")
    assert run(tmp_path / "torch", *common, "optimizer=adamw") == 0
    kernel = emulate_the_kernel(monkeypatch)
    assert run(tmp_path / "ours", *common, "optimizer=adamw_triton") == 0
    assert kernel.scaled == [True] * 6
    (theirs,), (ours,) = run_dirs(tmp_path / "torch" / "outputs"), run_dirs(tmp_path / "ours" / "outputs")
    expected, got = train_losses(theirs), train_losses(ours)
    assert sorted(got) == sorted(expected) and len(got) >= 2
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("option", [dict(fused=True), dict(foreach=True), dict(amsgrad=True)])
def test_torch_implementations_asked_by_name_and_options_the_kernel_lacks_are_torch_adamws_step(option, monkeypatch):
    """Where torch.optim.AdamW is configured (fused=True, amsgrad=True ...), TritonAdamW stands in: those steps are
    torch's own, bit for bit, even where the kernel would run."""
    kernel = emulate_the_kernel(monkeypatch)
    ours, theirs = make_params(), make_params()
    mine = TritonAdamW(ours, **OPTIONS, **option)
    run_steps(ours, mine)
    run_steps(theirs, torch.optim.AdamW(theirs, **OPTIONS, **option))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert kernel.launches == []
    again = TritonAdamW(make_params(), **OPTIONS, **option)
    again.load_state_dict(mine.state_dict())
    assert {k: v.device for k, v in again.state_dict()["state"][0].items()} == {
        k: v.device for k, v in mine.state_dict()["state"][0].items()}


def test_a_kernel_that_cannot_be_built_is_a_warning_and_torch_adamw_steps_on(monkeypatch):
    """A build failure at the first launch (another GPU or Triton than the kernel was written for) does not end
    the run: a warning names it, that step's tensors go through reference_step, and later steps are torch's."""

    class Unbuildable(EmulatedKernel):
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.launches.append(grid)
                raise RuntimeError("PassManager::run failed\ndetails")
            return launch

    kernel = emulate_the_kernel(monkeypatch, Unbuildable())
    ours, theirs = make_params(), make_params()
    mine = TritonAdamW(ours, **OPTIONS)
    with pytest.warns(UserWarning, match=r"without its kernel from now on: the kernel could not be built "
                                         r"\(RuntimeError: PassManager::run failed\)"):
        run_steps(ours, mine)
    run_steps(theirs, torch.optim.AdamW(theirs, **OPTIONS))
    assert len(kernel.launches) == 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_cuda_without_triton_is_a_warning(monkeypatch):
    monkeypatch.setattr(triton_adamw, "interpreting", lambda: True)  # the kernel's device, as on CUDA
    monkeypatch.setattr(triton_adamw, "_load_kernels", lambda: None)
    ours, theirs = make_params(), make_params()
    with pytest.warns(UserWarning, match="TritonAdamW steps with torch's AdamW: Triton is not installed"):
        run_steps(ours, TritonAdamW(ours, **OPTIONS))
    run_steps(theirs, torch.optim.AdamW(theirs, **OPTIONS))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stochastic_rounding_keeps_small_updates_and_the_kernel_rounds_as_the_reference(monkeypatch):
    """stochastic_rounding=True: bf16 parameters keep updates smaller than half a bf16 step in expectation (on the
    CPU through reference_step, where torch's step would round them away), and a kernel step (emulated) rounds
    every element with the step's seed and its own index, bit for bit as the reference path."""
    from helpers.weight_movement import movement, share_kept

    gen = torch.Generator().manual_seed(4)
    init = torch.randn(64, 96, generator=gen) * 0.05
    grads = [torch.randn(64, 96, generator=gen) for _ in range(30)]
    options = dict(lr=1e-5, weight_decay=0.0)
    runs = {name: movement(init, grads, dtype, lambda ps, r=rounding: TritonAdamW(ps, stochastic_rounding=r, **options))
            for name, dtype, rounding in (("fp32", torch.float32, True), ("sr", torch.bfloat16, True),
                                          ("nearest", torch.bfloat16, False))}
    kept = {name: share_kept(runs[name], runs["fp32"]) for name in runs}
    assert kept["nearest"] < 0.3 and 0.9 < kept["sr"] < 1.1

    reference = make_params(dtype=torch.bfloat16, shapes=((16, 24), (37,)))
    run_steps(reference, TritonAdamW(reference, stochastic_rounding=True, seed=7, **OPTIONS))
    kernel = emulate_the_kernel(monkeypatch)
    ours = make_params(dtype=torch.bfloat16, shapes=((16, 24), (37,)))
    run_steps(ours, TritonAdamW(ours, stochastic_rounding=True, seed=7, **OPTIONS))
    assert len(kernel.launches) == 5
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="stochastic_rounding is its own step's"):
        TritonAdamW(make_params(), stochastic_rounding=True, fused=True)


@pytest.mark.parametrize("name", ["TritonAdamW", "CompiledAdamW"])
def test_a_pickled_or_copied_optimizer_steps_on_as_the_original(name):
    """torch pickles an optimizer's defaults, state and groups only: our options travel with them and the caches
    start anew, so a copy (or an optimizer sent to another process) steps on exactly."""
    import copy
    import pickle

    from forgather import optim

    params = make_params()
    original = getattr(optim, name)(params, **OPTIONS)
    run_steps(params, original, steps=2)
    for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
        copied = clone.param_groups[0]["params"]
        run_steps(copied, clone, steps=2, seed=3)
        expected = [p.detach().clone().requires_grad_() for p in params]
        twin = getattr(optim, name)(expected, **OPTIONS)
        twin.load_state_dict(copy.deepcopy(original.state_dict()))  # (loading keeps the tensors: they would alias)
        run_steps(expected, twin, steps=2, seed=3)
        for a, b in zip(copied, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp32_moments_beside_bf16_parameters_survive_a_checkpoint_and_the_kernel_keeps_them(monkeypatch):
    """state_dtype=torch.float32: the moments are fp32 beside bf16 parameters (on the CPU through reference_step,
    where torch's step would make them bf16); a state dict loads them unrounded (torch casts them to the
    parameter's dtype), so a resumed run continues exactly; a kernel step (emulated) gives the same bits."""
    import copy

    def run(steps, optimizer=None, params=None, seed=1):
        params = params or make_params(dtype=torch.bfloat16)
        optimizer = optimizer or TritonAdamW(params, state_dtype=torch.float32, **OPTIONS)
        run_steps(params, optimizer, steps=steps, seed=seed)
        return params, optimizer

    whole, whole_optimizer = run(3)
    assert all(state[key].dtype == torch.float32 for state in whole_optimizer.state.values()
               for key in ("exp_avg", "exp_avg_sq"))
    run(3, whole_optimizer, whole, seed=2)
    cut, first = run(3)
    saved = copy.deepcopy(first.state_dict())
    resumed = TritonAdamW(cut, state_dtype=torch.float32, **OPTIONS)
    resumed.load_state_dict(saved)
    assert all(state["exp_avg"].dtype == torch.float32 for state in resumed.state.values())
    run(3, resumed, cut, seed=2)
    for a, b in zip(cut, whole):
        assert torch.equal(a, b)

    emulate_the_kernel(monkeypatch)
    kernel_run, _ = run(3)
    reference_run = make_params(dtype=torch.bfloat16)
    monkeypatch.undo()
    run(3, params=reference_run)
    for a, b in zip(kernel_run, reference_run):
        assert torch.equal(a, b)
