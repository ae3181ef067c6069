"""Model components: shapes, causality, attention-function agreement, packed documents, KV cache, tying,
validation and activation checkpointing -- on tiny CPU models."""

from __future__ import annotations

import functools

import pytest
import torch

from forgather.models.attention import Attention, AttentionMask
from forgather.models.causal_lm import CausalLM, sample_next_token, sample_rows
from forgather.models.feedforward import GELUMLP, SwiGLU
from forgather.models.kv_cache import KVCache
from forgather.models.layers import PostLNLayer, PreLNLayer
from forgather.models.norm import LayerNorm, RMSNorm
from forgather.models.rope import RotaryEmbedding, llama3_scale_frequencies, rope_frequencies

VOCAB, HIDDEN, HEADS, KV_HEADS = 97, 64, 4, 2  # head dim 16: the least attention_fn="packed" takes
ATTENTION_FUNCTIONS = ["sdpa", "flex", "packed", "eager"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(
    attention_fn: str = "sdpa",
    layer=PreLNLayer,
    tie_embeddings: bool = True,
    activation_checkpointing: bool = False,
    seed: int = 0,
    fused_norm: bool = False,
) -> CausalLM:
    torch.manual_seed(seed)
    norm = functools.partial(RMSNorm, fused=fused_norm)
    layer_factory = functools.partial(
        layer,
        attention_factory=functools.partial(
            Attention, num_heads=HEADS, num_kv_heads=KV_HEADS, attention_fn=attention_fn
        ),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=norm,
    )
    return CausalLM(
        VOCAB,
        HIDDEN,
        2,
        layer_factory,
        norm,
        rope=RotaryEmbedding(HIDDEN // HEADS, theta=10000.0),
        tie_embeddings=tie_embeddings,
        activation_checkpointing=activation_checkpointing,
    ).eval()


def random_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Three documents in each row, of lengths 4, 3 and 5 / 2, 6 and 4.
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])


def test_forward_and_hidden_states_have_documented_shapes():
    model, ids = tiny_model(), random_ids()
    with torch.no_grad():
        assert model(ids).shape == (2, 12, VOCAB)
        assert model.hidden_states(ids).shape == (2, 12, HIDDEN)
    assert model.lm_head_weight.shape == (VOCAB, HIDDEN)


def test_logits_are_the_hidden_states_times_the_head_weight():
    model, ids = tiny_model(tie_embeddings=False), random_ids()
    with torch.no_grad():
        expected = model.hidden_states(ids) @ model.lm_head_weight.T
        torch.testing.assert_close(model(ids), expected)


@pytest.mark.parametrize("attention_fn", ATTENTION_FUNCTIONS)
def test_changing_a_future_token_never_changes_an_earlier_logit(attention_fn):
    model, ids = tiny_model(attention_fn), random_ids()
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("attention_fn", ["sdpa", "flex", "packed"])
def test_attention_functions_agree_with_eager_reference(attention_fn, packed):
    ids = random_ids()
    position_ids = PACKED_POSITIONS if packed else None
    with torch.no_grad():
        reference = tiny_model("eager")(ids, position_ids)
        logits = tiny_model(attention_fn)(ids, position_ids)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_fn", ATTENTION_FUNCTIONS)
def test_packed_documents_equal_each_document_run_separately(attention_fn):
    model, ids = tiny_model(attention_fn), random_ids()
    with torch.no_grad():
        packed = model(ids, PACKED_POSITIONS)
        for row in range(ids.shape[0]):
            starts = (PACKED_POSITIONS[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for start, end in zip(starts, starts[1:]):
                alone = model(ids[row : row + 1, start:end])
                torch.testing.assert_close(packed[row : row + 1, start:end], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_fn", ATTENTION_FUNCTIONS)
def test_kv_cache_decoding_equals_full_sequence_logits(attention_fn):
    model, ids = tiny_model(attention_fn), random_ids()
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], kv_cache=cache)]
        steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


def test_kv_cache_continues_the_last_packed_document():
    model, ids = tiny_model(), random_ids()
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        full = model(ids, PACKED_POSITIONS)
        prefix = model(ids[:, :9], PACKED_POSITIONS[:, :9], kv_cache=cache)
        rest = model(ids[:, 9:], PACKED_POSITIONS[:, 9:], kv_cache=cache)
    torch.testing.assert_close(torch.cat((prefix, rest), dim=1), full, rtol=1e-5, atol=1e-5)


def test_tied_head_shares_storage_with_the_embedding():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head is None
    assert model.lm_head_weight.data_ptr() == model.embed.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters() if p.shape == (VOCAB, HIDDEN)) == VOCAB * HIDDEN


def test_untied_head_has_its_own_weight():
    model = tiny_model(tie_embeddings=False)
    assert model.lm_head is not None
    assert model.lm_head_weight.data_ptr() != model.embed.weight.data_ptr()


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"num_heads": 6}, ("num_heads=6", "hidden_size=64")),
        ({"num_heads": 4, "num_kv_heads": 3}, ("num_kv_heads=3", "num_heads=4")),
    ],
    ids=["heads-vs-hidden", "kv-heads-vs-heads"],
)
def test_inconsistent_attention_config_fails_naming_both_values(kwargs, names):
    with pytest.raises(ValueError) as error:
        Attention(64, **kwargs)
    assert all(name in str(error.value) for name in names)


def test_inconsistent_model_config_fails_at_construction():
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=6),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=RMSNorm,
    )
    with pytest.raises(ValueError, match=r"num_heads=6 does not divide hidden_size=64"):
        CausalLM(VOCAB, 64, 2, layer_factory, RMSNorm)


def test_rope_head_dim_must_match_attention_head_dim():
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=4),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=RMSNorm,
    )
    with pytest.raises(ValueError, match=r"rope head_dim=16 does not match attention head_dim=8"):
        CausalLM(VOCAB, 32, 2, layer_factory, RMSNorm, rope=RotaryEmbedding(16))


def test_unknown_attention_function_names_the_choices():
    with pytest.raises(ValueError, match=r"attention_fn='flash'.*eager.*flex.*sdpa"):
        Attention(32, 4, attention_fn="flash")
    with pytest.raises(ValueError, match=r"attention_fn='pakced'; did you mean 'packed'\? choose one of"):
        Attention(32, 4, attention_fn="pakced")


def test_flex_kernel_options_reach_the_flex_kernel(monkeypatch):
    import forgather.models.attention as attention

    seen = []

    def kernel(q, k, v, **kwargs):
        seen.append(kwargs)
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "_flex_kernel", lambda device: kernel)
    monkeypatch.setattr(attention, "_flex_unavailable", lambda q, k, mask: False)  # the GPU's path, on the CPU
    options = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_num_warps": 8, "BACKEND": "TRITON"}
    layer = Attention(32, 4, attention_fn="flex", kernel_options=options)
    x = torch.randn(1, 8, 32)
    mask = AttentionMask(8, 8, None, x.device)
    layer(x, None, mask)
    assert seen[-1]["kernel_options"] == options
    Attention(32, 4, attention_fn="flex")(x, None, mask)
    assert seen[-1]["kernel_options"] is None


def test_packed_rows_get_the_measured_flex_tiling_and_given_options_win(monkeypatch):
    """Without kernel options, packed documents on a GPU of PACKED_TILINGS get its tiling (torch's own default
    was measured slower there); rows without documents keep torch's; options given to the layer replace it."""
    import forgather.models.attention as attention

    seen = []

    def kernel(q, k, v, **kwargs):
        seen.append(kwargs)
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "_flex_kernel", lambda device: kernel)
    monkeypatch.setattr(attention, "_flex_unavailable", lambda q, k, mask: False)
    tiling = {"fwd_BLOCK_M": 64}
    monkeypatch.setattr(attention, "packed_kernel_options", lambda q, packed: tiling if packed else None)
    x = torch.randn(1, 8, 32)
    documents = AttentionMask(8, 8, torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3]]), x.device)
    Attention(32, 4, attention_fn="flex")(x, None, documents)
    assert seen[-1]["kernel_options"] == tiling
    Attention(32, 4, attention_fn="flex")(x, None, AttentionMask(8, 8, None, x.device))
    assert seen[-1]["kernel_options"] is None
    given = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32}
    Attention(32, 4, attention_fn="flex", kernel_options=given)(x, None, documents)
    assert seen[-1]["kernel_options"] == given


def test_packed_kernel_options_look_up_gpu_dtype_and_head_dim(monkeypatch):
    import types

    import forgather.models.attention as attention

    capability = {"major": 9, "minor": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(**capability))

    def query(device="cuda", dtype=torch.bfloat16, head_dim=64):  # stands in for a CUDA tensor on a CPU
        return types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(4, 32, 2048, head_dim))

    hopper = attention.PACKED_TILINGS[((9, 0), torch.bfloat16, 64)]
    assert attention.packed_kernel_options(query(), packed=True) == hopper
    assert attention.packed_kernel_options(query(), packed=False) is None
    assert attention.packed_kernel_options(query(head_dim=128), packed=True) is None
    assert attention.packed_kernel_options(query(dtype=torch.float32), packed=True) is None
    assert attention.packed_kernel_options(query(device="cpu"), packed=True) is None
    capability["major"] = 8
    assert attention.packed_kernel_options(query(), packed=True) is None


def test_packed_tilings_are_flex_options_whose_tiles_divide_the_mask_blocks():
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE

    import forgather.models.attention as attention

    assert attention.PACKED_TILINGS
    for options in attention.PACKED_TILINGS.values():
        assert attention.flex_kernel_options(options) == options
        for name, value in options.items():
            if "BLOCK_" in name:
                assert _DEFAULT_SPARSE_BLOCK_SIZE % value == 0, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_fn="flex", kernel_options={"fwd_BLOK_M": 64}), r"'fwd_BLOK_M' is not an option.*'fwd_BLOCK_M'"),
    (dict(attention_fn="flex", kernel_options={"num_warps": 4.0}), r"num_warps takes an integer; got float 4.0"),
    (dict(attention_fn="flex", kernel_options={"USE_TMA": 1}), r"USE_TMA takes true or false; got int 1"),
    (dict(attention_fn="flex", kernel_options={"BACKEND": "CUDNN"}), r"BACKEND takes one of \['AUTO'.*got 'CUDNN'"),
    (dict(attention_fn="sdpa", kernel_options={"BLOCK_M": 64}), r"kernel_options are flex's or packed attention's; "
                                                                r"attention_fn='sdpa' takes none"),
    (dict(attention_fn="packed", kernel_options={"fwd_BLOCK_M": 64}), r"'fwd_BLOCK_M' is not a kernel of "
                                                                     r"attention_fn='packed'.*forward / dq / dkdv"),
    (dict(attention_fn="packed", kernel_options={"dkdv": [32, 32, 8]}), r"dkdv takes \[BLOCK_M, BLOCK_N, num_warps, "
                                                                       r"num_stages\].*got \[32, 32, 8\]"),
    (dict(attention_fn="packed", kernel_options={"dq": [24, 32, 4, 3]}), r"the first three powers of two"),
    (dict(attention_fn="packed", kernel_options={"forward": [16, 8, 4, 3]}), r"BLOCK_N at least 16"),
    (dict(attention_fn="packed", num_heads=6, num_kv_heads=2), r"num_heads / num_kv_heads a power of two.*6 / 2"),
    (dict(attention_fn="packed", head_dim=24), r"head_dim in \(16, 32, 64, 128\).*heads of 24"),
    (dict(attention_fn="packed", dropout=0.1), r"attention_fn='packed' has no attention dropout"),
])
def test_bad_flex_kernel_options_are_named(kwargs, message):
    kwargs = {"num_heads": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        Attention(16 * kwargs["num_heads"], **kwargs)  # heads of 16


def test_document_bounds_are_each_runs_first_position_and_one_past_its_last():
    from forgather.models.attention import document_bounds

    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 5, 5, 5, 5], [3] * 10])
    start, end = document_bounds(ids)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == [[0, 0, 0, 3, 4, 4, 6, 6, 6, 6], [0] * 10]
    assert end.tolist() == [[3, 3, 3, 4, 6, 6, 10, 10, 10, 10], [10] * 10]
    for row in range(2):  # the bounds of each token's run, read off the ids one token at a time
        for t in range(10):
            same = [j for j in range(10) if ids[row, j] == ids[row, t]]
            assert (start[row, t], end[row, t]) == (min(same), max(same) + 1)


def test_packed_kernels_reference_is_the_document_mask_of_eager_attention():
    """packed_attention.reference_packed_attention -- the semantics the GPU kernels are tested against -- is
    eager attention under AttentionMask's document mask (packing's ids), grouped heads included."""
    from forgather.models.attention import AttentionMask, document_bounds, document_ids_from_positions, eager_attention
    from forgather.models.packed_attention import reference_packed_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    ids = document_ids_from_positions(PACKED_POSITIONS)
    start, _ = document_bounds(ids)
    expected = eager_attention(q, k, v, AttentionMask(12, 12, ids, q.device))
    torch.testing.assert_close(reference_packed_attention(q, k, v, start), expected, rtol=1e-5, atol=1e-5)


def test_packed_attention_hands_its_kernels_dense_inputs():
    """packed_attention._dense (before the op; compiled, the op failed on views with gaps, H100): the layers'
    [B, T, H, D] storage and plain [B, H, T, D] pass as the same tensor; a value split from fused key and value
    products (rows with gaps) and a head dim with a stride become a [B, T, H, D] copy of the same values."""
    from forgather.models.packed_attention import _dense

    heads = torch.randn(2, 12, 4, 8).transpose(1, 2)
    plain = torch.randn(2, 4, 12, 8)
    assert _dense(heads) is heads and _dense(plain) is plain
    kv = torch.randn(2, 12, 2 * 2 * 8)
    v = kv.split(16, dim=-1)[1].view(2, 12, 2, 8).transpose(1, 2)
    strided_dim = torch.randn(2, 4, 8, 12).transpose(-1, -2)
    for view in (v, strided_dim):
        dense = _dense(view)
        assert dense.transpose(1, 2).is_contiguous() and torch.equal(dense, view)


def test_packed_tiling_defaults_and_overrides_each_kernel():
    from forgather.models.packed_attention import KERNELS, TILING, tiling

    assert tiling() == [n for kernel in KERNELS for n in TILING[kernel]]
    changed = tiling({"dkdv": (64, 32, 8, 2)})
    assert changed[8:] == [64, 32, 8, 2] and changed[:8] == tiling()[:8]


def test_packed_attention_runs_sdpa_where_its_kernels_do_not():
    """On the CPU, without documents, and after a KV cache the packed function never calls its kernel."""
    from forgather.models.attention import AttentionMask, packed_attention, sdpa_attention

    def kernel(*args):
        raise AssertionError("the kernel ran")

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    for mask in (AttentionMask(6, 6, ids, q.device), AttentionMask(6, 6, None, q.device)):
        torch.testing.assert_close(packed_attention(q, k, v, mask, kernel=kernel), sdpa_attention(q, k, v, mask))


def test_activation_checkpointing_gives_the_same_gradients():
    ids = random_ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(activation_checkpointing=checkpointing).train()
        model(ids).logsumexp(-1).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def _lookup_sparseness(model: CausalLM, run) -> list[bool]:
    """Whether each embedding lookup during `run()` met the tied head's gradient (its autograd node's kind)."""
    seen = []
    handle = model.embed.register_forward_hook(
        lambda module, args, out: seen.append(type(out.grad_fn).__name__ == "_LookupBackward"))
    try:
        run()
    finally:
        handle.remove()
    return seen


def _train_step_grads(model: CausalLM, ids: torch.Tensor, steps: int = 1) -> tuple[list[float], dict]:
    losses = []
    for _ in range(steps):  # more than one: gradients accumulate into .grad
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.item())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("steps", [1, 2])
def test_a_tied_embeddings_sparse_gradient_sums_into_the_heads_dense_one(steps):
    ids = random_ids()
    runs = {}
    for sparse in (False, True):
        model = tiny_model().train()
        model.sparse_tied_grad = sparse
        seen = _lookup_sparseness(model, lambda: runs.__setitem__(sparse, _train_step_grads(model, ids, steps)))
        assert seen == [sparse] * steps
        assert model.embed.weight.grad.layout == torch.strided  # what optimizers take
    assert runs[True][0] == runs[False][0]
    for name, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], grad, msg=name)


def test_sparse_tied_gradient_is_only_where_it_pays():
    ids = random_ids()
    default = tiny_model().train()  # off unless asked for
    assert _lookup_sparseness(default, lambda: default(ids).sum().backward()) == [False]
    untied = tiny_model(tie_embeddings=False).train()
    untied.sparse_tied_grad = True
    assert _lookup_sparseness(untied, lambda: untied(ids).sum().backward()) == [False]
    model = tiny_model()
    model.sparse_tied_grad = True
    assert _lookup_sparseness(model, lambda: model(ids)) == [False]  # eval
    model.train()
    with torch.no_grad():
        assert _lookup_sparseness(model, lambda: model(ids)) == [False]


def test_a_sparse_lookup_gradient_no_head_joins_is_made_dense_and_trains():
    """hidden_states alone (a head of the user's own, a pipeline's first stage) leaves the lookup's gradient alone
    in .grad: it is dense there, equal to the dense lookup's, and an optimizer steps on it."""
    ids = random_ids()
    grads = []
    for sparse in (False, True):
        model = tiny_model().train()
        model.sparse_tied_grad = sparse
        model.hidden_states(ids).square().mean().backward()
        grads.append(model.embed.weight.grad)
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert grads[1].layout == torch.strided
    torch.testing.assert_close(grads[1], grads[0])


def test_the_tied_heads_gradient_takes_the_rows_in_place():
    """With sparse_tied_grad the weight's gradient is the head's own gradient tensor, the looked-up rows added
    into it: no dense gradient of the lookup (the lookup's fallback would be a new tensor)."""
    model = tiny_model().train()
    model.sparse_tied_grad = True
    ids = random_ids()
    hidden = model.hidden_states(ids)
    head = model.lm_head_weight
    handed = []  # where the head's gradient lies (not the tensor: a reference held here would make autograd copy it)
    head.register_hook(lambda grad: handed.append(grad.data_ptr()))
    torch.nn.functional.linear(hidden, head).logsumexp(-1).mean().backward()
    assert handed == [model.embed.weight.grad.data_ptr()]


def test_a_head_whose_lookup_is_not_in_the_backward_keeps_its_own_gradient():
    """The hand-over happens only when the lookup's backward runs in the same pass: a backward through the head
    alone, or autograd.grad of another forward, gets exactly the dense gradients."""
    model = tiny_model().train()
    model.sparse_tied_grad = True
    hidden = model.hidden_states(random_ids())
    head = model.lm_head_weight  # the lookup's graph is alive: this goes through the hand-over node
    assert type(head.grad_fn).__name__ == "_HeadBackward"
    head.square().sum().backward()
    torch.testing.assert_close(model.embed.weight.grad, 2 * model.embed.weight.detach(), rtol=0, atol=0)
    model.zero_grad()
    hidden.square().mean().backward()  # the lookup's own dense gradient
    plain = tiny_model().train()
    plain.hidden_states(random_ids()).square().mean().backward()
    torch.testing.assert_close(model.embed.weight.grad, plain.embed.weight.grad)


def test_the_tied_gradient_is_right_twice_through_a_kept_graph_and_in_autograd_grad():
    ids = random_ids()
    grads = {}
    for sparse in (False, True):
        model = tiny_model().train()
        model.sparse_tied_grad = sparse
        loss = model(ids).logsumexp(-1).mean()
        (first,) = torch.autograd.grad(loss, [model.embed.weight], retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
        grads[sparse] = (first, model.embed.weight.grad)
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    torch.testing.assert_close(grads[True][1], 2 * grads[True][0])


def test_a_model_copies_and_pickles_after_a_tied_forward():
    import copy
    import io

    model = tiny_model().train()
    model.sparse_tied_grad = True
    model(random_ids()).sum().backward()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for other in (copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        other(random_ids()).logsumexp(-1).mean().backward()
        assert other.embed.weight.grad is not None


def test_flex_model_trains_on_cpu_through_the_dense_fallback():
    model = tiny_model("flex").train()
    model(random_ids(), PACKED_POSITIONS).mean().backward()
    assert model.embed.weight.grad is not None


def test_post_ln_layer_swaps_in_through_the_layer_factory():
    model = tiny_model(layer=PostLNLayer)
    assert all(isinstance(layer, PostLNLayer) for layer in model.layers)
    ids = random_ids()
    with torch.no_grad():
        assert not torch.allclose(model(ids), tiny_model(layer=PreLNLayer)(ids))


def test_gelu_mlp_and_layer_norm_build_a_causal_model():
    torch.manual_seed(0)
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=4, bias=True),
        feedforward_factory=functools.partial(GELUMLP, intermediate_size=128, approximate="tanh"),
        norm_factory=LayerNorm,
    )
    model = CausalLM(VOCAB, HIDDEN, 2, layer_factory, LayerNorm, tie_embeddings=False).eval()
    ids = random_ids()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :-1], model(changed)[:, :-1], rtol=0, atol=0)


def test_rms_norm_output_has_unit_rms():
    x = torch.randn(3, 5, 16) * 7
    rms = RMSNorm(16, eps=0.0)(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms))


def test_layer_norm_matches_torch():
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(LayerNorm(16)(x), torch.nn.LayerNorm(16)(x))


def test_rope_preserves_relative_position_dot_products():
    rope = RotaryEmbedding(8)
    from forgather.models.rope import apply_rotary

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        cos_q, sin_q = rope(torch.tensor([[query_pos]]))
        cos_k, sin_k = rope(torch.tensor([[key_pos]]))
        return (apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum()

    torch.testing.assert_close(score(7, 3), score(14, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotating_heads_in_storage_order_gives_the_views_values_bit_for_bit(dtype):
    from forgather.models.rope import apply_rotary

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 8, generator=gen).to(dtype)  # [B, T, heads, D]
    cos, sin = torch.randn(2, 2, 16, 8, generator=gen).to(dtype).unbind(0)
    stored = apply_rotary(x, cos, sin, heads_dim=2)
    assert stored.shape == x.shape and stored.is_contiguous()
    assert torch.equal(stored.transpose(1, 2), apply_rotary(x.transpose(1, 2), cos, sin))
    assert not torch.equal(stored, apply_rotary(x, cos.roll(1, 1), sin.roll(1, 1), heads_dim=2))  # angles per position


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=4, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    )
    expected, _ = _compute_llama3_parameters(config)
    ours = llama3_scale_frequencies(rope_frequencies(32, 500000.0), **scaling)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, rope_frequencies(32, 500000.0))


def test_greedy_generate_equals_repeated_full_forward_argmax():
    model, ids = tiny_model(), random_ids(seq=5)
    generated = model.generate(ids, max_new_tokens=6)
    reference = ids
    with torch.no_grad():
        for _ in range(6):
            reference = torch.cat((reference, model(reference)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, reference)


def test_generate_stops_rows_at_eos_and_pads_with_it():
    model, ids = tiny_model(), random_ids(seq=5)
    greedy = model.generate(ids, max_new_tokens=6)
    eos = int(greedy[0, 6])
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    first_eos = (stopped[0, 5:] == eos).nonzero()[0].item() + 5
    assert (stopped[0, first_eos:] == eos).all()
    assert torch.equal(stopped[0, :first_eos], greedy[0, :first_eos])


def test_sampling_with_a_seeded_generator_is_reproducible():
    model, ids = tiny_model(), random_ids(seq=5)
    runs = [
        model.generate(ids, 8, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_top_k_one_sampling_is_greedy():
    logits = torch.randn(4, VOCAB)
    sampled = sample_next_token(logits, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, logits.argmax(-1))


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    probs = logits[0].softmax(-1)
    assert probs[0] < 0.8 < probs[0] + probs[1]  # the nucleus for top_p=0.8 is tokens {0, 1}
    sampled = sample_next_token(logits, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(sampled.tolist()) == {0, 1}


def test_reordered_kv_cache_continues_the_selected_rows():
    model, ids = tiny_model(), random_ids(batch=3, seq=8)
    order = torch.tensor([2, 0, 0])
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        model(ids[:, :6], PACKED_POSITIONS[:1, :6].expand(3, 6), kv_cache=cache)
        cache.reorder_cache(order)
        continued = model(ids[order, 6:], PACKED_POSITIONS[:1, 6:8].expand(3, 2), kv_cache=cache)
        expected = model(ids[order], PACKED_POSITIONS[:1, :8].expand(3, 8))[:, 6:]
    torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fused_norm", [False, True], ids=["norm", "fused_norm"])
def test_whole_model_compiles_without_graph_breaks(fused_norm):
    """(fused_norm: on the CPU the torch norm, but through RMSNorm.add_and_norm's checks, which must trace.)"""
    model, ids = tiny_model(fused_norm=fused_norm).train(), random_ids()
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(ids, PACKED_POSITIONS)
    logits.mean().backward()
    torch.testing.assert_close(logits, model(ids, PACKED_POSITIONS), rtol=1e-5, atol=1e-5)


def test_importing_the_models_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, forgather.models; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _llama_state_for_ours(hf_state: dict) -> dict:
    """Hugging Face Llama parameter names -> this library's."""
    renames = {
        "model.embed_tokens.": "embed.",
        "model.norm.": "norm.",
        "model.layers.": "layers.",
        ".self_attn.": ".attention.",
        ".mlp.": ".feedforward.",
        ".input_layernorm.": ".attention_norm.",
        ".post_attention_layernorm.": ".feedforward_norm.",
    }
    ours = {}
    for name, value in hf_state.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        ours[name] = value
    return ours


def test_llama_shaped_model_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling},
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=HEADS, num_kv_heads=KV_HEADS),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=64),
        norm_factory=RMSNorm,
    )
    rope = RotaryEmbedding(HIDDEN // HEADS, theta=500000.0, llama3_scaling=scaling)
    model = CausalLM(VOCAB, HIDDEN, 2, layer_factory, RMSNorm, rope=rope, tie_embeddings=False).eval()
    model.load_state_dict(_llama_state_for_ours(reference.state_dict()))
    ids = random_ids(seq=24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_run_from_outside_with_layer_inputs_equal_hidden_states():
    """The contract a pipeline stage relies on: embed, any slice of layers, norm."""
    model, ids = tiny_model(), random_ids()
    with torch.no_grad():
        rope, mask = model.layer_inputs(PACKED_POSITIONS, PACKED_POSITIONS)
        x = model.embed(ids)
        for layer in model.layers:
            x = layer(x, rope, mask)
        torch.testing.assert_close(model.norm(x), model.hidden_states(ids, PACKED_POSITIONS), rtol=0, atol=0)


def test_swiglu_in_token_chunks_equals_the_whole_and_saves_less_for_backward():
    from forgather.models.feedforward import SwiGLU

    torch.manual_seed(0)
    whole = SwiGLU(16, 64)
    chunked = SwiGLU(16, 64, chunk_tokens=7)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 20, 16)

    def run(module):
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        inputs = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = module(inputs)
        out.square().sum().backward()
        grads = [inputs.grad] + [p.grad for p in module.parameters()]
        return out, grads, sum(saved)

    out_whole, grads_whole, saved_whole = run(whole)
    out_chunked, grads_chunked, saved_chunked = run(chunked)
    torch.testing.assert_close(out_chunked, out_whole)
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Kept for backward: the chunks' inputs only, not the [tokens, 64] activations.
    assert saved_chunked < saved_whole / 3
    with torch.no_grad():  # inference never chunks
        torch.testing.assert_close(chunked(x), whole(x))


def test_rows_sampled_together_are_each_what_sample_next_token_draws_alone():
    """sample_rows (the serving engine's sampler): every row's token is the one sample_next_token gives that row
    alone with a generator in the same state, whatever the other rows' temperatures and top_p (None: no
    filtering), and each generator advances as it would alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    temperatures = [0.7, 1.0, 0.7, 1.3, 1.0, 0.5]
    top_ps = [0.9, None, None, 0.5, 0.95, 0.9]
    for draw in range(5):
        generators = [torch.Generator().manual_seed(100 * draw + i) for i in range(6)]
        alone = [torch.Generator().manual_seed(100 * draw + i) for i in range(6)]
        together = sample_rows(logits, temperatures, top_ps, generators)
        expected = [int(sample_next_token(logits[i:i + 1], temperatures[i], None, top_ps[i], alone[i])[0])
                    for i in range(6)]
        assert together.tolist() == expected
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(generators, alone))
    one = sample_rows(logits[3:4], [1.3], [0.5], [torch.Generator().manual_seed(3)])
    assert one.tolist() == [int(sample_next_token(logits[3:4], 1.3, None, 0.5, torch.Generator().manual_seed(3))[0])]
    with pytest.raises(ValueError, match="6 rows of logits, 2 temperatures"):
        sample_rows(logits, [1.0, 1.0], top_ps, generators)


def test_a_fused_rms_norm_runs_the_torch_norm_off_the_gpu_and_stays_picklable():
    """RMSNorm(fused=True) on CPU tensors (and without Triton) is RMSNorm exactly, forward, `add_and_norm` and
    gradients; it pickles and deep-copies like any module (it keeps the ops' functions, not their module)."""
    import copy
    import pickle

    from forgather.models.norm import add_and_norm

    torch.manual_seed(0)
    plain, fused = RMSNorm(HIDDEN), RMSNorm(HIDDEN, fused=True)
    fused.load_state_dict({"weight": torch.rand(HIDDEN) + 0.5})
    plain.load_state_dict(fused.state_dict())
    x, delta = torch.randn(2, 5, HIDDEN, requires_grad=True), torch.randn(2, 5, HIDDEN)
    results = []
    for norm in (fused, plain):
        x.grad = None
        s, y = add_and_norm(norm, x, delta)
        (y.square().sum() + s.sum()).backward()
        results.append((s, y, norm(x), x.grad, norm.weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], x + delta, rtol=0, atol=0)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        torch.testing.assert_close(clone(x), fused(x), rtol=0, atol=0)


def test_a_fused_rms_norm_on_a_gpu_machine_without_triton_says_it_runs_the_torch_norm(monkeypatch):
    from forgather.models import norm

    monkeypatch.setattr(norm, "triton_ops", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match=r"RMSNorm\(fused=True\) runs the torch norm: Triton is not installed"):
        RMSNorm(HIDDEN, fused=True)


def test_add_and_norm_of_a_norm_without_its_own_is_the_sum_and_its_norm():
    from forgather.models.norm import add_and_norm

    norm = LayerNorm(HIDDEN)
    x, delta = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    s, y = add_and_norm(norm, x, delta)
    torch.testing.assert_close(s, x + delta, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(x + delta), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [PreLNLayer, PostLNLayer])
def test_weights_put_in_place_by_module_hooks_give_the_same_hidden_states(layer):
    """accelerate's offload keeps the weights elsewhere and puts each module's in place in a hook on its `forward`
    (cpu_offload, per module; device_map, per layer): the layers must reach every weight through a module call.
    The head is the known exception (a functional call: serve/placement.py moves the hidden states to it)."""
    accelerate = pytest.importorskip("accelerate")
    model, ids = tiny_model(layer=layer, tie_embeddings=False), random_ids()
    with torch.no_grad():
        expected = model.hidden_states(ids)
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.layers[0].feedforward_norm.weight.device.type == "meta"
        torch.testing.assert_close(model.hidden_states(ids), expected, rtol=0, atol=0)


def _with_dropout(model: CausalLM, p: float) -> CausalLM:
    for layer in model.layers:
        layer.dropout, layer.residual_dropout = torch.nn.Dropout(p), torch.nn.Dropout(p)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_passes_the_residual_stream_as_a_pair_and_computes_the_same_bits(dropout):
    """In training, PreLN layers hand the stream on as (x, delta) and the next norm adds it (layers.py): the same
    operations in the same order as one tensor, so the same loss and gradients, bit for bit, dropout included."""
    ids = random_ids()
    results = []
    for carried in (True, False):
        model = _with_dropout(tiny_model(), dropout).train()
        calls, joined = [], []
        for layer in model.layers:
            layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("carry", False)),
                                            with_kwargs=True)
        for norm in (module for module in model.modules() if isinstance(module, RMSNorm)):
            # a norm given the delta adds it: on a GPU one fused kernel, no add of its own (forward and backward)
            norm.register_forward_pre_hook(lambda module, args: joined.append(len(args) == 2))
        model.carry_residual = carried
        torch.manual_seed(7)
        loss = model(ids).float().pow(2).mean()
        loss.backward()
        assert calls == [carried, carried]
        assert sum(joined) == (4 if carried else 2) and len(joined) == 5  # of 2 x 2 + 1 norms
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (expected_loss, expected_grads) = results
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


class _OwnForwardLayer(PreLNLayer):
    """A project's layer: PreLN's parts, a forward of its own with the one-tensor signature."""

    def forward(self, x, rope, mask, kv_cache=None):
        return super().forward(x, rope, mask, kv_cache)


def test_the_stream_is_one_tensor_in_inference_with_checkpointing_and_for_other_layers():
    ids = random_ids()
    for model in (tiny_model().eval(), tiny_model(activation_checkpointing=True).train(),
                  tiny_model(layer=PostLNLayer).train(), tiny_model(layer=_OwnForwardLayer).train()):
        carried = []
        for layer in model.layers:
            layer.register_forward_pre_hook(lambda module, args, kwargs: carried.append("carry" in kwargs),
                                            with_kwargs=True)
        model(ids)
        assert carried == [False, False]


def test_half_precision_model_rounds_the_rope_tables_once_to_the_same_logits_and_gradients():
    """A bf16 model gets bf16 cos/sin from layer_inputs (one rounding a step, not one a layer); the logits and
    gradients are bitwise those of fp32 tables rounded inside each layer's apply_rotary."""
    model = tiny_model().to(torch.bfloat16).train()
    ids = random_ids()
    rope, _ = model.layer_inputs(ids)
    assert all(table.dtype == torch.bfloat16 for table in rope)
    assert all(table.dtype == torch.float32 for table in tiny_model().layer_inputs(ids)[0])

    def logits_and_grads(m):
        m.zero_grad()
        logits = m(ids)
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters()]

    ours = logits_and_grads(model)
    fp32_tables = CausalLM.layer_inputs

    def layer_inputs_fp32(self, input_ids, position_ids=None, kv_cache=None):  # the tables as they were before
        from forgather.models.causal_lm import _positions_and_documents

        _, mask = fp32_tables(self, input_ids, position_ids, kv_cache)
        positions, _ = _positions_and_documents(*input_ids.shape, position_ids, kv_cache, input_ids.device)
        return self.rope(positions), mask

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CausalLM, "layer_inputs", layer_inputs_fp32)
        before = logits_and_grads(model)
    torch.testing.assert_close(ours[0], before[0], rtol=0, atol=0)
    for a, b in zip(ours[1], before[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
