"""forgather.loss on CPU: the interface (shift, ignore-index, options, extras) and ChunkedLoss against NaiveLoss."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from forgather.loss import CCELoss, ChunkedLoss, LigerLoss, MissingExtraError, NaiveLoss, get_loss
from helpers.losses import loss_and_grads

torch.set_num_threads(1)


def make_inputs(batch=2, seq=9, hidden=16, vocab=37, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return h, w, labels


def test_naive_loss_predicts_the_next_token():
    h, w, labels = make_inputs()
    logits = h[:, :-1] @ w.t()
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(NaiveLoss()(h, w, labels), expected)


def test_naive_loss_skips_ignore_index_positions():
    h, w, labels = make_inputs()
    labels[0, 3:6] = -100
    logits = (h[:, :-1] @ w.t()).reshape(-1, w.shape[0])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(NaiveLoss()(h, w, labels), expected)


@pytest.mark.parametrize("chunk_size, inplace", [(1, True), (5, True), (18, False), (64, True), (64, False)])
def test_chunked_matches_naive_loss_and_gradients(chunk_size, inplace):
    h, w, labels = make_inputs()
    labels[1, :4] = -100
    ref = loss_and_grads(NaiveLoss(), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=chunk_size, compile=False, inplace=inplace), h, w, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"z_loss": 1e-2}, {"softcap": 3.0}, {"z_loss": 1e-3, "softcap": 2.0}])
def test_chunked_matches_naive_with_z_loss_and_softcap(options):
    h, w, labels = make_inputs(seed=1)
    ref = loss_and_grads(NaiveLoss(**options), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=7, compile=False, **options), h, w, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_scales_gradients_by_the_incoming_gradient():
    h, w, labels = make_inputs(seed=2)
    _, gh, gw = loss_and_grads(lambda *a: 3.0 * NaiveLoss()(*a), h, w, labels)
    _, ch, cw = loss_and_grads(lambda *a: 3.0 * ChunkedLoss(chunk_size=4, compile=False)(*a), h, w, labels)
    torch.testing.assert_close(ch, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-6)


def test_chunked_bf16_is_within_bf16_tolerance_of_fp32_reference():
    h, w, labels = make_inputs(batch=2, seq=33, hidden=64, vocab=301, seed=3)
    ref_loss, ref_h, ref_w = loss_and_grads(NaiveLoss(), h, w, labels)
    loss, gh, gw = loss_and_grads(ChunkedLoss(chunk_size=16, compile=False), h.bfloat16(), w.bfloat16(), labels)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for got, ref in ((gh, ref_h), (gw, ref_w)):
        assert ((got.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("chunk_size, seq", [(5, 9), (64, 9), (4, 1)])
def test_the_first_chunk_writes_every_element_of_the_weight_gradient(monkeypatch, chunk_size, seq):
    """grad weight starts uninitialized where the first chunk's product is written into it: memory full of NaN
    there must leave no trace, whether more chunks follow or not, or every target is ignored (seq 1)."""
    import forgather.loss.chunked as chunked

    def poisoned(tensor, **kwargs):
        return torch.full_like(tensor, float("nan"), **kwargs)

    monkeypatch.setattr(chunked.torch, "empty_like", poisoned)
    h, w, labels = make_inputs(seq=seq)
    ref = loss_and_grads(NaiveLoss(), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=chunk_size, compile=False), h, w, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_all_ignored_labels_give_zero_loss_and_zero_gradients():
    h, w, labels = make_inputs()
    labels.fill_(-100)
    for loss_fn in (NaiveLoss(), ChunkedLoss(chunk_size=4, compile=False)):
        loss, gh, gw = loss_and_grads(loss_fn, h, w, labels)
        assert loss.item() == 0.0
        assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_chunked_runs_without_gradients_under_no_grad():
    h, w, labels = make_inputs()
    with torch.no_grad():
        got = ChunkedLoss(chunk_size=4, compile=False)(h, w, labels)
        ref = NaiveLoss()(h, w, labels)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("inplace", [True, False])
def test_chunked_compiled_matches_naive(inplace):
    h, w, labels = make_inputs(seed=4)
    ref = loss_and_grads(NaiveLoss(softcap=5.0), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=8, compile=True, inplace=inplace, softcap=5.0), h, w, labels)
    assert got[1].abs().max() > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_option_is_a_clear_error():
    with pytest.raises(ValueError, match="'cce' does not support z_loss"):
        CCELoss(z_loss=1e-4)


def test_missing_extra_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(MissingExtraError, match=r"loss 'liger' needs liger-kernel: pip install 'forgather\[gpu\]'"):
        LigerLoss()


def test_mismatched_shapes_are_rejected():
    h, w, labels = make_inputs()
    with pytest.raises(ValueError, match="labels"):
        NaiveLoss()(h, w, labels[:, :-1])


def test_get_loss_builds_by_name_and_rejects_unknown_names():
    assert isinstance(get_loss("chunked", chunk_size=8, compile=False), ChunkedLoss)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")


def test_importing_forgather_loss_imports_no_gpu_package():
    code = (
        "import sys, forgather.loss\n"
        "bad = [m for m in ('liger_kernel', 'cut_cross_entropy', 'triton', 'torch') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_chunked_refuses_a_second_backward_through_the_same_forward():
    # Its gradients are scaled in place by the first backward; a second one would scale them twice.
    h, w, labels = make_inputs(seed=4)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = ChunkedLoss(chunk_size=5, compile=False)(h, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_gradient_scaling_multiplies_bf16_in_fp32():
    from forgather.loss.chunked import scale_in_place

    x = torch.randn(1000, 100).bfloat16()
    factor = torch.tensor(1 / 3000)
    scaled = x.clone()
    scale_in_place(scaled, factor)
    assert torch.equal(scaled, (x.float() * factor).bfloat16())
    assert not torch.equal(scaled, x * factor.bfloat16())  # what rounding the factor first would give


def test_chunked_under_bf16_autocast_returns_fp32_gradients_close_to_the_reference():
    # bf16-mixed training: fp32 weights, the loss runs inside autocast (bf16 matmuls).
    h, w, labels = make_inputs(batch=2, seq=33, hidden=64, vocab=301, seed=5)
    ref_loss, ref_h, ref_w = loss_and_grads(NaiveLoss(), h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = loss_and_grads(ChunkedLoss(chunk_size=16, compile=False), h, w, labels)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for got, ref in ((gh, ref_h), (gw, ref_w)):
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2
