"""GPU losses against the fp32 NaiveLoss reference: loss and both gradients, bf16 inputs (needs CUDA).

Tolerance (bf16 operands, fp32 reference): loss within 1e-2 relative, gradients within 2e-2 relative norm.
"""

import pytest
import torch

from forgather.loss import CCELoss, ChunkedLoss, FusedLoss, LigerLoss, NaiveLoss
from forgather.loss.chunked import scale_in_place, scale_unless_one
from helpers.cuda_sync import sync_is_an_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOSS_RTOL, GRAD_RTOL = 1e-2, 2e-2


def make_inputs(seed, batch=2, seq=512, hidden=256, vocab=8200):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(batch, seq, hidden, device="cuda", generator=gen)
    w = torch.randn(vocab, hidden, device="cuda", generator=gen) / hidden**0.5 * 4
    labels = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    labels[0, 100:180] = -100
    return h, w, labels


def loss_and_grads(loss_fn, h, w, labels):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = loss_fn(h, w, labels)
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def build(name, **options):
    if name == "chunked":
        return ChunkedLoss(chunk_size=384, compile=True, **options)
    if name == "liger":
        pytest.importorskip("liger_kernel")
        return LigerLoss(**options)
    if name == "fused":
        pytest.importorskip("liger_kernel")
        return FusedLoss(**options)
    pytest.importorskip("cut_cross_entropy")
    return CCELoss(**options)


@pytest.mark.parametrize(
    "name, options",
    [
        ("chunked", {}), ("liger", {}), ("cce", {}), ("fused", {}),
        ("chunked", {"z_loss": 1e-3, "softcap": 20.0}), ("liger", {"z_loss": 1e-3, "softcap": 20.0}),
        ("cce", {"softcap": 20.0}), ("fused", {"z_loss": 1e-3, "softcap": 20.0}),
        ("fused", {"chunk_size": 100}),  # a last chunk shorter than the others
    ],
)
def test_gpu_loss_matches_fp32_reference(name, options):
    h, w, labels = make_inputs(seed=len(name) + len(options))
    semantics = {key: value for key, value in options.items() if key in ("z_loss", "softcap")}
    ref = loss_and_grads(NaiveLoss(**semantics), h, w, labels)
    got = loss_and_grads(build(name, **options), h.bfloat16(), w.bfloat16(), labels)
    assert torch.isfinite(got[0]).item()
    assert abs(got[0].item() - ref[0].item()) <= LOSS_RTOL * abs(ref[0].item())
    assert rel_err(got[1], ref[1]) < GRAD_RTOL
    assert rel_err(got[2], ref[2]) < GRAD_RTOL


def test_chunked_compiled_fp32_matches_reference_tightly():
    h, w, labels = make_inputs(seed=7, seq=256, vocab=3000)
    ref = loss_and_grads(NaiveLoss(), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=200, compile=True), h, w, labels)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-4


def test_fused_fp32_matches_reference_tightly():
    pytest.importorskip("liger_kernel")
    h, w, labels = make_inputs(seed=8, seq=256, vocab=3000)
    ref = loss_and_grads(NaiveLoss(), h, w, labels)
    got = loss_and_grads(FusedLoss(chunk_size=200), h, w, labels)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("name", ["fused", "chunked"])
def test_loss_forward_and_backward_never_wait_for_the_gpu(name):
    # The host can queue the whole training step ahead of the device only if no op in the loss synchronizes.
    loss_fn = build(name)
    h, w, labels = make_inputs(seed=9)
    h, w = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss_and_grads(loss_fn, h, w, labels)  # compile / autotune outside the check
    h.grad = w.grad = None
    with sync_is_an_error():
        loss = loss_fn(h, w, labels)
        loss.backward()
    assert h.grad is not None and w.grad is not None


def test_gradient_scaling_keeps_the_fp32_factor():
    # backward multiplies bf16 gradients by an fp32 device scalar (grad_output / tokens) in place: the factor
    # must not be rounded to bf16 first (that would scale every gradient by up to 2^-9 too much or too little).
    x = torch.randn(1000, 100, device="cuda").bfloat16()
    factor = torch.tensor(1 / 3000, device="cuda")
    scaled = x.clone()
    scale_in_place(scaled, factor)
    assert torch.equal(scaled, (x.float() * factor).bfloat16())


def test_scale_unless_one_leaves_a_unit_factor_alone_and_scales_in_fp32_otherwise():
    # the kernel behind the head's weight gradient: a factor of 1 returns on the device; others as scale_in_place
    x = torch.randn(3 * 4096 * 132 * 4 + 5, device="cuda").bfloat16()  # more than one stride of the programs
    got = x.clone()
    scale_unless_one(got, torch.tensor(1.0, device="cuda"))
    assert torch.equal(got, x)
    factor = torch.tensor(1 / 3000, device="cuda")
    scale_unless_one(got, factor)
    assert torch.equal(got, (x.float() * factor).bfloat16())


@pytest.mark.parametrize("name", ["fused", "chunked"])
def test_loss_scaled_before_backward_scales_both_gradients(name):
    # the weight's gradient takes 1 / tokens in forward and grad_output in backward (skipped when it is 1): a
    # loss multiplied by 0.25 (a power of two: exact in every rounding) must give exactly 0.25 x the gradients
    loss_fn = build(name)
    h, w, labels = make_inputs(seed=11)
    h, w = h.bfloat16(), w.bfloat16()
    _, gh, gw = loss_and_grads(loss_fn, h, w, labels)
    _, qh, qw = loss_and_grads(lambda *a: loss_fn(*a) * 0.25, h, w, labels)
    assert torch.equal(qh, gh * 0.25) and torch.equal(qw, gw * 0.25)


@pytest.mark.parametrize("name", ["fused", "chunked"])
def test_loss_under_bf16_autocast_with_fp32_weights(name):
    # bf16-mixed training: the loss sees fp32 hidden states and weight inside autocast.
    loss_fn = build(name)
    h, w, labels = make_inputs(seed=10)
    ref = loss_and_grads(NaiveLoss(), h, w, labels)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(h, w, labels)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref[0].item()) <= LOSS_RTOL * abs(ref[0].item())
    assert rel_err(h.grad, ref[1]) < GRAD_RTOL
    assert rel_err(w.grad, ref[2]) < GRAD_RTOL


@pytest.mark.parametrize("name", ["chunked", "liger", "cce", "fused"])
def test_every_label_ignored_gives_zero_and_zero_gradients(name):
    # CCE's own mean over no valid token is NaN (our wrapper takes its sum over max(1, tokens))
    h, w, labels = make_inputs(seed=10, seq=64)
    labels[:] = -100
    loss, grad_h, grad_w = loss_and_grads(build(name), h.bfloat16(), w.bfloat16(), labels)
    assert loss.item() == 0 and not grad_h.any() and not grad_w.any()


@pytest.mark.parametrize("name", ["chunked", "fused"])
def test_a_label_outside_the_vocabulary_fails_the_step_instead_of_a_wrong_loss(name):
    # The device-side assertion ends the CUDA context, so in a process of its own.
    import subprocess
    import sys

    code = (
        "import torch; from forgather.loss import ChunkedLoss, FusedLoss\n"
        f"loss = {'ChunkedLoss(compile=True)' if name == 'chunked' else 'FusedLoss()'}\n"
        "h = torch.randn(2, 64, 128, device='cuda', dtype=torch.bfloat16)\n"
        "w = torch.randn(1000, 128, device='cuda', dtype=torch.bfloat16)\n"
        "labels = torch.randint(0, 1000, (2, 64), device='cuda'); labels[1, 7] = 1003\n"
        "print(float(loss(h, w, labels)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]
