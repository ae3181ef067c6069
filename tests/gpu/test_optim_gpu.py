"""TritonAdafactor against the PyTorch reference on CUDA, and optimizer_in_backward with it (needs CUDA).

Tolerance: fp32 parameters within rtol 1e-5 / atol 1e-6 after several steps (only summation order differs:
the kernels reduce with atomics); bf16 parameters within bf16 rounding (rtol 1.6e-2).
"""

import contextlib
from functools import partial

import pytest
import torch

from forgather.optim import Adafactor, TritonAdafactor, optimizer_in_backward
from helpers.cuda_sync import sync_is_an_error
from helpers.weight_movement import movement, share_kept

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(300, 517), (1, 1000), (1024, 3000), (64, 1), (777,)]


def run_pair(options, shapes=SHAPES, dtype=torch.float32, steps=5, seed=0, between=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    init = [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    ref_params = [p.clone().requires_grad_() for p in init]
    tri_params = [p.clone().requires_grad_() for p in init]
    ref, tri = Adafactor(ref_params, **options), TritonAdafactor(tri_params, **options)
    for step in range(steps):
        for a, b in zip(ref_params, tri_params):
            g = (torch.randn(a.shape, device="cuda", generator=gen) * (step + 1)).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        tri.step()
        if between is not None:
            between(step, ref_params, tri_params)
    return ref_params, tri_params, ref, tri


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lr": 0.05, "weight_decay": 0.1},
        {"beta1": 0.9, "d": 0.5},
        {"relative_step": False, "scale_parameter": False, "lr": 1e-3},
        {"maximize": True},
    ],
)
def test_triton_adafactor_matches_reference_fp32(options):
    ref_params, tri_params, ref, tri = run_pair(options)
    for a, b in zip(ref_params, tri_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref_params, tri_params):
        for key, atol in (("row_var", 1e-12), ("col_var", 1e-12), ("exp_avg", 1e-6)):
            if key in ref.state[a]:
                torch.testing.assert_close(tri.state[b][key], ref.state[a][key], rtol=1e-5, atol=atol)


def test_triton_adafactor_bf16_params_within_bf16_rounding():
    # Rounded to nearest: stochastic rounding of two slightly different fp32 results (atomics change the
    # summation order) draws different noise, and those 1-ulp differences random-walk over the steps. Its
    # kernel is checked bit for bit against the reference below.
    ref_params, tri_params, _, _ = run_pair({"beta1": 0.9, "stochastic_rounding": False}, dtype=torch.bfloat16)
    for a, b in zip(ref_params, tri_params):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=1.6e-2, atol=1e-2)


def test_parameters_changed_between_steps_are_noticed():
    def perturb(step, ref_params, tri_params):
        if step == 1:
            with torch.no_grad():
                for a, b in zip(ref_params, tri_params):
                    a.mul_(3.0)
                    b.mul_(3.0)

    ref_params, tri_params, _, _ = run_pair({}, between=perturb)
    for a, b in zip(ref_params, tri_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_state_is_as_small_as_torch_adafactor():
    params = [torch.randn(512, 2048, device="cuda", requires_grad=True)]
    ours, theirs = TritonAdafactor(params), torch.optim.Adafactor(params)
    params[0].grad = torch.randn_like(params[0])
    ours.step()
    theirs.step()

    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.is_cuda)

    assert state_bytes(ours) <= state_bytes(theirs) + 16


def test_optimizer_in_backward_with_triton_adafactor_matches_a_plain_step():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
    hooked = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).cuda()
    hooked.load_state_dict(plain.state_dict())
    opt = TritonAdafactor(plain.parameters(), lr=1e-2)
    optimizer_in_backward(hooked, partial(TritonAdafactor, lr=1e-2))
    for _ in range(3):
        x = torch.randn(32, 256, device="cuda")
        opt.zero_grad()
        plain(x).square().mean().backward()
        opt.step()
        hooked(x).square().mean().backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("triton", [False, True], ids=["torch-fused", "TritonAdamW"])
@pytest.mark.parametrize("bucket_size", [None, 5_000_000], ids=["per-parameter", "buckets"])
def test_overlapped_adamw_in_backward_is_the_plain_fused_step_bit_for_bit(bucket_size, triton):
    """Steps on a side stream alongside backward, one parameter or one bucket of ~5M elements at a time: the
    parameters after each backward (read on the default stream, no synchronization in between) are those of
    the same AdamW stepped over the whole model after backward, in bf16: torch's fused kernel, or TritonAdamW
    (one launch a bucket; the in-backward variant measured in docs/guides/gpu_training.md)."""
    from forgather.optim import TritonAdamW

    adamw = TritonAdamW if triton else partial(torch.optim.AdamW, fused=True)
    torch.manual_seed(0)

    def model():
        layers = [torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)]
        return torch.nn.Sequential(*layers, torch.nn.Linear(1024, 1024)).cuda().to(torch.bfloat16)

    plain, hooked = model(), model()
    hooked.load_state_dict(plain.state_dict())
    opt = adamw(plain.parameters(), lr=1e-3, weight_decay=0.1)
    in_bwd = optimizer_in_backward(hooked, partial(adamw, lr=1e-3, weight_decay=0.1), overlap=True,
                                   bucket_size=bucket_size)
    assert len(in_bwd.buckets) == (6 if bucket_size is None else 2)
    for _ in range(4):
        x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
        opt.zero_grad()
        plain(x).float().square().mean().backward()
        opt.step()
        hooked(x).float().square().mean().backward()
        for a, b in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(a, b)
    assert list(in_bwd._side) == [torch.device("cuda", 0)] and not in_bwd._waiting
    assert all(p.grad is None for p in hooked.parameters())


def test_a_backward_pass_that_raises_does_not_leave_the_next_one_unjoined():
    """The join is queued once per backward pass (autograd graph task): a pass that raised after some steps ran
    never reached its end, and the next pass still joins at its own."""
    first, second = torch.nn.Linear(64, 64).cuda(), torch.nn.Linear(64, 64).cuda()
    in_bwd = optimizer_in_backward([*first.parameters(), *second.parameters()],
                                   partial(torch.optim.AdamW, lr=1e-3), overlap=True)
    x = torch.randn(8, 64, device="cuda")

    def fail(grad):
        raise RuntimeError("stop here")

    hidden = first(x)
    hidden.register_hook(fail)  # reached after `second`'s parameters have stepped
    with pytest.raises(RuntimeError, match="stop here"):
        second(hidden).sum().backward()
    assert in_bwd._waiting  # steps ran on the side stream; the pass never joined
    second(first(x)).sum().backward()
    assert not in_bwd._waiting


def test_kernel_stochastic_rounding_is_the_reference_bit_for_bit():
    import triton
    import triton.language as tl

    from forgather.optim.adafactor_kernels import _stochastic_round_bits
    from forgather.optim.rounding import stochastic_round_to_bf16

    @triton.jit
    def round_kernel(X, Y, numel, seed, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        x = tl.load(X + offsets, mask=mask, other=0.0)
        tl.store(Y + offsets, _stochastic_round_bits(x, offsets, seed).to(tl.bfloat16), mask=mask)

    x = torch.randn(100_003, device="cuda") * 0.02
    x[:4] = torch.tensor([float("inf"), -float("inf"), 0.0, -1.00390625])
    for seed in (0, 12345, 2**31 - 1):
        got = torch.empty_like(x, dtype=torch.bfloat16)
        round_kernel[(triton.cdiv(x.numel(), 1024),)](x, got, x.numel(), seed, BLOCK=1024)
        assert torch.equal(got.view(torch.int16), stochastic_round_to_bf16(x, seed).view(torch.int16))


def test_triton_adafactor_bf16_keeps_updates_smaller_than_half_a_bf16_step():
    gen = torch.Generator(device="cuda").manual_seed(1)
    init = torch.randn(512, 768, device="cuda", generator=gen) * 0.02
    grads = [torch.randn(512, 768, device="cuda", generator=gen)] * 30
    runs = {
        name: movement(init, grads, dtype, partial(optimizer, lr=1e-4, stochastic_rounding=rounding))
        for name, dtype, optimizer, rounding in (("fp32", torch.float32, Adafactor, True),
                                                 ("triton", torch.bfloat16, TritonAdafactor, True),
                                                 ("nearest", torch.bfloat16, TritonAdafactor, False))
    }
    kept = {name: share_kept(runs[name], runs["fp32"]) for name in runs}
    assert kept["nearest"] < 0.3
    assert 0.9 < kept["triton"] < 1.1


def test_forgather_adamw_compiled_fp32_matches_torch_adamw():
    from forgather.optim import AdamW

    gen = torch.Generator(device="cuda").manual_seed(3)
    init = [torch.randn(s, device="cuda", generator=gen) * 0.02 for s in ((300, 517), (777,))]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt_a, opt_b = AdamW(ours, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, device="cuda", generator=gen)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_forgather_adamw_bf16_keeps_small_updates_without_waiting_for_the_gpu():
    from forgather.optim import AdamW

    gen = torch.Generator(device="cuda").manual_seed(4)
    init = torch.randn(512, 768, device="cuda", generator=gen) * 0.05
    grads = [torch.randn(512, 768, device="cuda", generator=gen) for _ in range(30)]
    runs = {
        name: movement(init, grads, dtype, partial(AdamW, lr=1e-5, weight_decay=0.0, stochastic_rounding=rounding),
                       later_steps=sync_is_an_error)  # the first step compiles
        for name, dtype, rounding in (("fp32", torch.float32, True), ("sr", torch.bfloat16, True),
                                      ("nearest", torch.bfloat16, False))
    }
    kept = {name: share_kept(runs[name], runs["fp32"]) for name in runs}
    assert kept["nearest"] < 0.3
    assert 0.9 < kept["sr"] < 1.1


def step_beside(mine, fused, schedules, warm):
    """One step of our optimizer (where `warm`, any wait for the GPU in it an error), of torch's fused AdamW,
    then of each learning-rate schedule."""
    if warm:
        with sync_is_an_error():
            mine.step()
    else:
        mine.step()
    fused.step()
    for schedule in schedules:
        schedule.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_adamw_is_the_fused_step_with_a_device_rate_and_one_compile(dtype):
    """CompiledAdamW on CUDA: its compiled foreach step gives torch's fused AdamW's parameters (fp32: within
    summation order; bf16: within a bf16 rounding) under a schedule that changes the rate every step, which
    neither compiles again nor reads the rate back to the host; a loaded state dict keeps the rate on the GPU."""
    import torch._dynamo

    from forgather.optim import CompiledAdamW

    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # counters outlive reset(): earlier tests' count
    gen = torch.Generator(device="cuda").manual_seed(5)
    init = [(torch.randn(s, device="cuda", generator=gen) * 0.02).to(dtype) for s in ((300, 517), (777,), (64, 8))]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    mine, fused = CompiledAdamW(ours, **options), torch.optim.AdamW(theirs, fused=True, **options)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (step + 1)) for o in (mine, fused)]
    for step in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, device="cuda", generator=gen).to(dtype)
            b.grad = a.grad.clone()
        step_beside(mine, fused, schedules, warm=step >= 2)  # compiled and warm: the step waits for nothing
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 2
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-4)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tolerance)
    again = CompiledAdamW(ours, **options)
    again.load_state_dict(mine.state_dict())
    rate = again.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor) and rate.is_cuda and rate.item() == pytest.approx(1e-2 / 7)


@pytest.mark.parametrize("shapes", [((300, 517), (777,), (64, 8), (0,), (4097,)),
                                    ((256, 512), (2048,), (64, 16), (0,))],
                         ids=["odd", "aligned"])  # "aligned": every bucket takes the ALIGNED hint
@pytest.mark.parametrize("clip", [False, True], ids=["", "clipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_adamw_is_torch_fused_adamw_in_one_launch_without_waits(dtype, clip, shapes):
    """TritonAdamW on CUDA gives torch's fused AdamW's parameters and moments (fp32: within a rounding of the
    largest value; bf16: within two bf16 roundings, the stored moments round once per step in both) under a
    schedule that changes the rate every step, with a parameter without a gradient at one step, a
    non-contiguous one (the reference path) and an empty one; once warm, a step reads nothing back from the
    GPU. `clipped`: its clip_grad_norm_ (the factor folded into the kernel) against torch's clip_grad_norm_."""
    from forgather.optim import TritonAdamW

    gen = torch.Generator(device="cuda").manual_seed(6)
    init = [(torch.randn(s, device="cuda", generator=gen) * 0.02).to(dtype) for s in shapes]
    init.append((torch.randn(9, 6, device="cuda", generator=gen) * 0.02).to(dtype).t())
    ours = [p.clone().requires_grad_() if p.is_contiguous() else p.detach().t().clone().t().requires_grad_()
            for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    mine, fused = TritonAdamW(ours, **options), torch.optim.AdamW(theirs, fused=True, **options)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (step + 1)) for o in (mine, fused)]
    for step in range(6):
        for index, (a, b) in enumerate(zip(ours, theirs)):
            grad = None if (step == 2 and index == 1) else torch.randn(a.shape, device="cuda", generator=gen).to(dtype)
            if grad is not None and not a.is_contiguous():  # the parameter's layout (torch's fused kernel walks
                grad = grad.t().contiguous().t()  # its tensors' memory in one order)
            a.grad = None if grad is None else grad.clone()
            b.grad = None if grad is None else grad.clone()
        if clip:
            with_grads = [p for p in theirs if p.grad is not None]
            norms = mine.clip_grad_norm_(0.5), torch.nn.utils.clip_grad_norm_(with_grads, 0.5)
            assert norms[0].item() > 0.5 and torch.equal(*norms)
        step_beside(mine, fused, schedules, warm=step >= 3)
    assert not ours[-1].is_contiguous()
    rounding = 2.0 ** -20 if dtype == torch.float32 else 2.0 ** -7
    for a, b in zip(ours, theirs):
        pairs = [(a, b)] + [(mine.state[a][key], fused.state[b][key]) for key in ("exp_avg", "exp_avg_sq")]
        for x, y in pairs:
            if y.numel():
                torch.testing.assert_close(x, y, rtol=0, atol=2 * rounding * y.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_adamw_measures_the_gradient_norm_in_its_step_without_waits(dtype):
    """request_grad_norm on CUDA: the kernel's per-program sums of squares (a non-contiguous parameter's on the
    reference path beside them) give get_total_norm's value within fp32 rounding, without the host waiting."""
    from forgather.optim import TritonAdamW

    gen = torch.Generator(device="cuda").manual_seed(7)
    params = [(torch.randn(s, device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_()
              for s in ((300, 517), (777,), (4097,), (256, 512))]
    params.append((torch.randn(9, 6, device="cuda", generator=gen)).to(dtype).t().detach().requires_grad_())
    optimizer = TritonAdamW(params, lr=1e-3)
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype).reshape(p.shape)
        expected = torch.nn.utils.get_total_norm([p.grad.float() for p in params])
        assert optimizer.folds_grad_norm()
        optimizer.request_grad_norm()
        with sync_is_an_error() if step else contextlib.nullcontext():  # the first step builds the kernel
            optimizer.step()
            got = optimizer.take_grad_norm()
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_triton_adamw_rounding_stochastically_keeps_small_updates_without_waiting_for_the_gpu():
    from forgather.optim import TritonAdamW

    gen = torch.Generator(device="cuda").manual_seed(4)
    init = torch.randn(512, 768, device="cuda", generator=gen) * 0.05
    grads = [torch.randn(512, 768, device="cuda", generator=gen) for _ in range(30)]
    runs = {
        name: movement(init, grads, dtype,
                       partial(TritonAdamW, lr=1e-5, weight_decay=0.0, stochastic_rounding=rounding),
                       later_steps=sync_is_an_error)
        for name, dtype, rounding in (("fp32", torch.float32, True), ("sr", torch.bfloat16, True),
                                      ("nearest", torch.bfloat16, False))
    }
    kept = {name: share_kept(runs[name], runs["fp32"]) for name in runs}
    assert kept["nearest"] < 0.3
    assert 0.9 < kept["sr"] < 1.1


def test_triton_adafactor_stacks_a_models_vectors_and_matches_the_reference():
    """Norm weights (many vectors of one shape) take one stacked update a step: within fp32 rounding of the
    reference (a row's norm may sum in another order than the vector's), beside a 2-D parameter through the
    kernels, with no host wait once the shapes are known."""
    shapes = [(4096,)] * 6 + [(300, 517)]
    ref_params, tri_params, _, tri = run_pair({"beta1": 0.9, "weight_decay": 0.1}, shapes=shapes)
    for a, b in zip(ref_params, tri_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p in tri_params:
        p.grad = torch.randn_like(p)
    with sync_is_an_error():
        tri.step()


def test_triton_adamw_fp32_moments_beside_bf16_parameters_follow_the_reference():
    """state_dtype=torch.float32: the kernel's fp32 moments are the CPU reference path's within fp32 rounding,
    its bf16 parameters within a bf16 rounding a step."""
    from forgather.optim import TritonAdamW

    gen = torch.Generator(device="cuda").manual_seed(7)
    init = [(torch.randn(s, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for s in ((300, 517), (777,))]
    gpu = [p.clone().requires_grad_() for p in init]
    cpu = [p.detach().cpu().clone().requires_grad_() for p in init]
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.float32)
    ours, reference = TritonAdamW(gpu, **options), TritonAdamW(cpu, **options)
    for _ in range(3):
        for a, b in zip(gpu, cpu):
            a.grad = torch.randn(a.shape, device="cuda", generator=gen).to(torch.bfloat16)
            b.grad = a.grad.cpu()
        ours.step()
        reference.step()
    for a, b in zip(gpu, cpu):
        for key in ("exp_avg", "exp_avg_sq"):
            mine, expected = ours.state[a][key].cpu(), reference.state[b][key]
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
        torch.testing.assert_close(a.detach().cpu().float(), b.detach().float(), rtol=0,
                                   atol=3 * 2.0 ** -7 * b.detach().float().abs().max().item())
