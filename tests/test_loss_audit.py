"""forgather.loss at its edges, on CPU: labels out of range or of odd dtypes, mixed dtypes, fp64 gradients, empty
sequences, option checks (before any optional package is needed), and the CCE wrapper's reference semantics
(through a CPU stand-in for cut_cross_entropy that reduces as CCE does)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from forgather.loss import CCELoss, ChunkedLoss, FusedLoss, LigerLoss, MissingExtraError, NaiveLoss
from helpers.losses import loss_and_grads

torch.set_num_threads(1)

VOCAB = 37


def make_inputs(batch=2, seq=9, hidden=16, vocab=VOCAB, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return h, w, labels


LOSSES = {
    "naive": lambda **kw: NaiveLoss(**kw),
    "chunked": lambda **kw: ChunkedLoss(chunk_size=4, compile=False, **kw),
    "chunked-compiled": lambda **kw: ChunkedLoss(chunk_size=4, compile=True, **kw),
}
EAGER = ["naive", "chunked"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -5])
def test_a_label_outside_the_vocabulary_is_a_clear_error(name, bad):
    h, w, labels = make_inputs()
    labels[1, 4] = bad
    with pytest.raises(RuntimeError, match=rf"labels must be token ids in \[0, {VOCAB}\) or ignore_index \(-100\)"):
        LOSSES[name]()(h, w, labels)


@pytest.mark.parametrize("name", EAGER)
def test_an_ignore_index_inside_the_vocabulary_is_no_range_error(name):
    h, w, labels = make_inputs()
    labels[0, 2:5] = 3
    logits = (h[:, :-1] @ w.t()).reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(logits, targets, ignore_index=3)
    torch.testing.assert_close(LOSSES[name](ignore_index=3)(h, w, labels), expected)


@pytest.mark.parametrize("name", EAGER)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_give_the_int64_result(name, dtype):
    h, w, labels = make_inputs()
    loss = LOSSES[name]()
    torch.testing.assert_close(loss(h, w, labels.to(dtype)), loss(h, w, labels))


@pytest.mark.parametrize("name", EAGER)
def test_bool_labels_are_rejected(name):
    h, w, labels = make_inputs()
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        LOSSES[name]()(h, w, labels > 10)


@pytest.mark.parametrize("name", EAGER)
def test_hidden_and_weight_of_different_dtypes_outside_autocast_are_a_clear_error(name):
    h, w, labels = make_inputs()
    with pytest.raises(ValueError, match=r"hidden is torch\.bfloat16 but weight is torch\.float32.*autocast"):
        LOSSES[name]()(h.bfloat16(), w, labels)


@pytest.mark.parametrize("name", EAGER)
def test_mixed_dtypes_under_autocast_still_run(name):
    h, w, labels = make_inputs()
    ref = NaiveLoss()(h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES[name]()(h.bfloat16(), w, labels)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", EAGER)
def test_a_weight_that_is_not_a_matrix_is_a_clear_error(name):
    h, w, labels = make_inputs()
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        LOSSES[name]()(h, w[0], labels)


@pytest.mark.parametrize("name", EAGER)
def test_an_empty_sequence_gives_zero_loss_and_zero_gradients(name):
    h, w, labels = make_inputs(seq=0)
    loss, gh, gw = loss_and_grads(LOSSES[name](), h, w, labels)
    assert loss.item() == 0.0 and gh.shape == h.shape and gw.abs().max().item() == 0.0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_with_z_loss_and_softcap_is_zero_not_nan(name, dtype):
    h, w, labels = make_inputs(dtype=dtype)
    labels.fill_(-100)
    loss, gh, gw = loss_and_grads(LOSSES[name](z_loss=1e-3, softcap=5.0), h, w, labels)
    assert loss.item() == 0.0
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_naive_loss_keeps_fp64_and_passes_gradcheck():
    h, w, labels = make_inputs(batch=2, seq=5, hidden=4, vocab=7, dtype=torch.float64)
    labels[0, 2] = -100
    assert NaiveLoss()(h, w, labels).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda h, w: NaiveLoss(z_loss=1e-2, softcap=3.0)(h, w, labels), (h.requires_grad_(), w.requires_grad_())
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 18, 1000])  # B*T = 18: divisors, not, and larger
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-2, "softcap": 3.0}, {"ignore_index": 5}])
def test_chunked_matches_the_naive_loss_in_fp64(chunk_size, options):
    h, w, labels = make_inputs(dtype=torch.float64)
    labels[1, 3:6] = options.get("ignore_index", -100)
    ref = loss_and_grads(NaiveLoss(**options), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=chunk_size, compile=False, **options), h, w, labels)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_compiled_matches_the_naive_loss_in_fp64():
    h, w, labels = make_inputs(dtype=torch.float64, seed=2)
    ref = loss_and_grads(NaiveLoss(z_loss=1e-2), h, w, labels)
    got = loss_and_grads(ChunkedLoss(chunk_size=5, compile=True, z_loss=1e-2), h, w, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", EAGER)
def test_non_contiguous_hidden_states_give_the_contiguous_result(name):
    h, w, labels = make_inputs(dtype=torch.float64)
    strided = h.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    for a, b in zip(loss_and_grads(LOSSES[name](), strided, w, labels), loss_and_grads(LOSSES[name](), h, w, labels)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"compile": "false"}, r"ChunkedLoss\(compile='false'\): compile takes true or false"),
        ({"inplace": None}, r"ChunkedLoss\(inplace=None\): inplace takes true or false"),
        ({"z_loss": float("nan")}, r"ChunkedLoss\(z_loss=nan\): z_loss takes a number >= 0"),
        ({"z_loss": float("inf")}, r"ChunkedLoss\(z_loss=inf\): z_loss takes a number >= 0"),
        ({"softcap": float("nan")}, r"ChunkedLoss\(softcap=nan\): softcap takes a number > 0"),
        ({"softcap": float("inf")}, r"ChunkedLoss\(softcap=inf\): softcap takes a number > 0"),
        ({"softcap": 0}, r"ChunkedLoss\(softcap=0\): softcap takes a number > 0"),
        ({"softcap": -1.0}, r"ChunkedLoss\(softcap=-1.0\): softcap takes a number > 0"),
    ],
)
def test_bad_options_name_the_option_and_what_to_give(options, message):
    with pytest.raises(ValueError, match=message):
        ChunkedLoss(**options)


@pytest.mark.parametrize(
    "make, module, message",
    [
        (lambda: FusedLoss(chunk_size=0), "liger_kernel", r"FusedLoss\(chunk_size=0\): chunk_size takes"),
        (lambda: LigerLoss(chunk_mem_const=0), "liger_kernel",
         r"LigerLoss\(chunk_mem_const=0\): chunk_mem_const takes an integer >= 1"),
        (lambda: LigerLoss(chunk_mem_const=1.5), "liger_kernel", r"LigerLoss\(chunk_mem_const=1.5\)"),
        (lambda: CCELoss(filter_eps="high"), "cut_cross_entropy",
         r"CCELoss\(filter_eps='high'\): filter_eps takes 'auto', None or a number >= 0"),
        (lambda: CCELoss(filter_eps=-1.0), "cut_cross_entropy", r"CCELoss\(filter_eps=-1.0\)"),
        (lambda: CCELoss(softcap=-1.0), "cut_cross_entropy", r"CCELoss\(softcap=-1.0\)"),
    ],
)
def test_options_are_checked_before_the_optional_package_is_needed(monkeypatch, make, module, message):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make, module, package",
    [(FusedLoss, "liger_kernel", "liger-kernel"), (LigerLoss, "liger_kernel", "liger-kernel"),
     (CCELoss, "cut_cross_entropy", "cut-cross-entropy")],
)
def test_a_missing_package_is_a_one_line_error_naming_pip_install(monkeypatch, make, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message and package in message and "pip install 'forgather[gpu]'" in message


def fake_cut_cross_entropy(calls):
    """A CPU stand-in for cut_cross_entropy.linear_cross_entropy that reduces as CCE's own does
    (cut_cross_entropy/cce.py: the per-token nll of the valid rows only, then `nll.mean()` or `nll.sum()`)."""

    def linear_cross_entropy(e, c, targets, ignore_index, softcap, reduction, filter_eps, impl):
        calls.append({"reduction": reduction, "filter_eps": filter_eps, "impl": impl})
        logits = (e @ c.t()).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        valid = targets != ignore_index
        nll = F.cross_entropy(logits[valid], targets[valid], reduction="none")
        return {"mean": nll.mean, "sum": nll.sum}[reduction]()

    module = types.ModuleType("cut_cross_entropy")
    module.linear_cross_entropy = linear_cross_entropy
    return module


def test_cce_wrapper_matches_the_naive_loss(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", fake_cut_cross_entropy(calls))
    h, w, labels = make_inputs()
    labels[0, 2:6] = -100
    ref = loss_and_grads(NaiveLoss(softcap=4.0), h, w, labels)
    got = loss_and_grads(CCELoss(softcap=4.0, filter_eps=0), h, w, labels)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert calls[0]["filter_eps"] == 0.0 and isinstance(calls[0]["filter_eps"], float)  # CCE takes no int eps


def test_cce_wrapper_with_every_label_ignored_is_zero_not_nan(monkeypatch):
    # CCE's mean over no valid rows is NaN (and its backward divides by their count, 0).
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", fake_cut_cross_entropy([]))
    h, w, labels = make_inputs()
    labels.fill_(-100)
    loss, gh, gw = loss_and_grads(CCELoss(), h, w, labels)
    assert loss.item() == 0.0
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0
