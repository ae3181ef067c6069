"""Model components on CUDA: compiled flex attention agrees with SDPA (packed documents, forward and backward)
and KV-cache decoding with flex attention matches full-sequence logits."""

from __future__ import annotations

import functools

import pytest
import torch

from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.kv_cache import KVCache
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB, HIDDEN, HEADS, KV_HEADS, SEQ = 512, 256, 8, 2, 384
TOLERANCE = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def model(attention_fn: str, dtype: torch.dtype = torch.float32) -> CausalLM:
    torch.manual_seed(0)
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=HEADS, num_kv_heads=KV_HEADS, attention_fn=attention_fn),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=4 * HIDDEN),
        norm_factory=RMSNorm,
    )
    built = CausalLM(VOCAB, HIDDEN, 2, layer_factory, RMSNorm, rope=RotaryEmbedding(HIDDEN // HEADS))
    return built.to(device="cuda", dtype=dtype)


def packed_positions(batch: int = 2) -> torch.Tensor:
    """Documents of uneven lengths (not multiples of flex attention's 128-token blocks)."""
    lengths = [[100, 37, 200, 47], [384]][:batch]
    rows = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    return torch.stack(rows).cuda()


def wide_model(attention_fn: str, fused_norm: bool = False, fused_projections: bool | str = False,
               fused_swiglu: bool = False) -> CausalLM:
    """Heads of 64 (8 over 2 kv heads) in bf16: the head dim and dtype of the measured packed tilings."""
    torch.manual_seed(0)
    norm = functools.partial(RMSNorm, fused=fused_norm)
    layer_factory = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=8, num_kv_heads=2, attention_fn=attention_fn,
                                            fused_projections=fused_projections),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=1024,
                                              fused_projections=fused_projections is True, fused=fused_swiglu),
        norm_factory=norm,
    )
    built = CausalLM(VOCAB, 512, 2, layer_factory, norm, rope=RotaryEmbedding(64))
    return built.to(device="cuda", dtype=torch.bfloat16)


def token_ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1)).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_compiled_flex_attention_matches_sdpa_forward(dtype, packed):
    positions = packed_positions() if packed else None
    with torch.no_grad():
        flex_logits = model("flex", dtype)(token_ids(), positions)
        sdpa_logits = model("sdpa", dtype)(token_ids(), positions)
    torch.testing.assert_close(flex_logits.float(), sdpa_logits.float(), **TOLERANCE[dtype])


def test_compiled_flex_attention_matches_sdpa_gradients():
    grads = {}
    for attention_fn in ("flex", "sdpa"):
        built = model(attention_fn)
        built(token_ids(), packed_positions()).float().logsumexp(-1).mean().backward()
        grads[attention_fn] = {name: p.grad for name, p in built.named_parameters()}
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_flex_kv_cache_decoding_matches_full_sequence_on_gpu():
    """Prefill (256 queries) runs compiled flex attention; the one-token steps take the dense fallback."""
    built, ids = model("flex"), token_ids(1)[:, :264]
    cache = KVCache(len(built.layers))
    with torch.no_grad():
        full = built(ids)
        steps = [built(ids[:, :256], kv_cache=cache)]
        steps += [built(ids[:, t : t + 1], kv_cache=cache) for t in range(256, 264)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOLERANCE[torch.float32])


def test_flex_model_generates_on_gpu_like_sdpa():
    prompt = token_ids(1)[:, :200]
    assert torch.equal(model("flex").generate(prompt, 8), model("sdpa").generate(prompt, 8))


def test_compiled_model_with_flex_trains_like_eager_sdpa():
    """Whole-model torch.compile with flex attention, as in training (forward + backward, no graph breaks).

    Inference under whole-model compile (no_grad) fails in inductor on torch 2.11 ("convert FlexibleLayout
    to FixedLayout first"); eager models use separately compiled flex attention and are not affected.
    """
    compiled = torch.compile(model("flex", torch.bfloat16), fullgraph=True)
    logits = compiled(token_ids(), packed_positions())
    logits.float().logsumexp(-1).mean().backward()
    with torch.no_grad():
        reference = model("sdpa", torch.bfloat16)(token_ids(), packed_positions())
    torch.testing.assert_close(logits.detach().float(), reference.float(), **TOLERANCE[torch.bfloat16])


def test_packed_tiling_compiles_and_matches_sdpa_at_head_dim_64():
    """Head dim 64 in bf16, packed documents: the tiling of PACKED_TILINGS for this GPU (Hopper's, measured
    faster; torch's own elsewhere) is looked up under whole-model compile without a graph break (fullgraph), and
    the logits and gradients agree with SDPA's."""
    from forgather.models.attention import PACKED_TILINGS, packed_kernel_options

    capability = torch.cuda.get_device_capability()
    query = torch.zeros(1, 8, 128, 64, device="cuda", dtype=torch.bfloat16)
    assert packed_kernel_options(query, packed=True) == PACKED_TILINGS.get((capability, torch.bfloat16, 64))
    assert packed_kernel_options(query, packed=False) is None

    results = {}
    for name, built in (("flex", torch.compile(wide_model("flex"), fullgraph=True)),
                        ("flex eager model", wide_model("flex")), ("sdpa", wide_model("sdpa"))):
        logits = built(token_ids(), packed_positions())
        logits.float().logsumexp(-1).mean().backward()
        module = getattr(built, "_orig_mod", built)
        results[name] = (logits.detach().float(), module.layers[0].attention.q_proj.weight.grad.float())
    for name in ("flex", "flex eager model"):
        torch.testing.assert_close(results[name][0], results["sdpa"][0], **TOLERANCE[torch.bfloat16], msg=name)
        grad, reference = results[name][1], results["sdpa"][1]
        assert ((grad - reference).norm() / reference.norm()).item() < 2e-2, name  # bf16 sums in another order


def _packed_rows(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 384, 64), (1, 4, 4, 300, 128), (2, 16, 4, 2048, 64)],
                         ids=["gqa4-d64", "mha-d128-ragged", "bench-heads"])
def test_packed_attention_kernels_match_the_reference(dtype, shape):
    """Our Triton kernels (attention_fn='packed') against the fp32 reference of their semantics: outputs and the
    three gradients, documents of uneven lengths (one token, one spanning blocks, a row that is one document),
    rows whose length is not a multiple of the tiles."""
    from forgather.models.attention import document_bounds
    from forgather.models.packed_attention import packed_attention, reference_packed_attention

    batch, heads, kv_heads, length, dim = shape
    generator = torch.Generator().manual_seed(0)
    rows = [[1, 37, 200], [length]] if batch == 2 else [[5, 130, 1, 64]]
    rows = [row + [length - sum(row)] if sum(row) < length else row for row in rows]
    start, end = document_bounds(_packed_rows(rows))

    def tensor(h: int) -> torch.Tensor:  # stored [B, T, H, D], as a layer's heads are
        x = torch.randn(batch, length, h, dim, generator=generator).transpose(1, 2)
        return x.to("cuda", dtype).requires_grad_()

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn(batch, heads, length, dim, generator=generator).to("cuda", dtype)
    out = packed_attention(q, k, v, start, end)
    out.backward(grad)
    results = [out, q.grad, k.grad, v.grad]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = reference_packed_attention(q32, k32, v32, start)
    reference.backward(grad.float())
    tolerance = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, (reference, q32.grad, k32.grad, v32.grad)):
        assert torch.isfinite(got).all(), name
        error = ((got.float() - want).norm() / want.norm()).item()
        assert error < (1e-3 if dtype == torch.float32 else 1e-2), (name, error)
        torch.testing.assert_close(got.float(), want, **tolerance, msg=name)


def logits_and_grads(built: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of `built` on packed rows: the logits and every parameter's gradient, in fp32."""
    logits = built(token_ids(), packed_positions())
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach().float(), {name: p.grad.float() for name, p in built.named_parameters()}


def assert_trains_alike(got: tuple, want: tuple, relative: float) -> None:
    """Two logits_and_grads results: logits within bf16's tolerance, each gradient within `relative` (norm)."""
    torch.testing.assert_close(got[0], want[0], **TOLERANCE[torch.bfloat16])
    assert got[1].keys() == want[1].keys()
    for name, reference in want[1].items():
        assert ((got[1][name] - reference).norm() / reference.norm()).item() < relative, name


def test_compiled_model_with_packed_attention_trains_like_sdpa():
    """attention_fn='packed' under whole-model compile (fullgraph: the custom ops trace without a break): the
    logits and a weight's gradient agree with SDPA's on packed documents; plain causal rows take SDPA itself."""
    results = {}
    for name, built in (("packed", torch.compile(wide_model("packed"), fullgraph=True)), ("sdpa", wide_model("sdpa"))):
        logits = built(token_ids(), packed_positions())
        logits.float().logsumexp(-1).mean().backward()
        module = getattr(built, "_orig_mod", built)
        results[name] = (logits.detach().float(), module.layers[0].attention.q_proj.weight.grad.float())
    torch.testing.assert_close(results["packed"][0], results["sdpa"][0], **TOLERANCE[torch.bfloat16])
    grad, reference = results["packed"][1], results["sdpa"][1]
    assert ((grad - reference).norm() / reference.norm()).item() < 2e-2
    with torch.no_grad():
        torch.testing.assert_close(wide_model("packed")(token_ids()), wide_model("sdpa")(token_ids()), rtol=0, atol=0)


@pytest.mark.parametrize("fused_projections", [False, "kv", True, "auto"], ids=["separate", "fused-kv", "fused-all", "auto"])
def test_packed_attention_under_layer_compile_takes_fused_projections(fused_projections):
    """Each layer compiled, as the trainer's default compile_scope does: with fused projections the values
    reach the kernels as a view into the wider product (gaps between rows), which once read past the end of
    the tensor inductor handed over (fused_projections=kv crashed the 1.24B bench, H100, 2026-12-05). Logits
    and every gradient agree with SDPA's on packed documents."""
    results = {}
    for name in ("packed", "sdpa"):
        built = wide_model(name, fused_projections=fused_projections)
        if name == "packed":
            for layer in built.layers:
                layer.compile()
        results[name] = logits_and_grads(built)
        torch.cuda.synchronize()
    assert_trains_alike(results["packed"], results["sdpa"], 2e-2)


def test_packed_attention_takes_views_with_gaps_under_compile():
    """The op itself under torch.compile with k and v split from one wider product (rows with gaps) and q stored
    [B, H, T, D] (the other dense layout): outputs and gradients match the reference."""
    from forgather.models.attention import document_bounds
    from forgather.models.packed_attention import packed_attention, reference_packed_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 8, 2, 384, 64
    start, end = document_bounds(_packed_rows([[1, 37, 200, 146], [length]]))
    q = torch.randn(batch, heads, length, dim, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    kv = torch.randn(batch, length, 2 * kv_heads * dim, generator=generator).to("cuda", torch.bfloat16)
    kv.requires_grad_()
    grad = torch.randn(batch, heads, length, dim, generator=generator).to("cuda", torch.bfloat16)

    def attend(q, kv):
        k, v = (t.view(batch, length, kv_heads, dim).transpose(1, 2) for t in kv.split(kv_heads * dim, dim=-1))
        return packed_attention(q, k, v, start, end)

    out = torch.compile(attend, fullgraph=True)(q, kv)
    out.backward(grad)
    torch.cuda.synchronize()
    q32, kv32 = (t.detach().float().requires_grad_() for t in (q, kv))
    k32, v32 = (t.view(batch, length, kv_heads, dim).transpose(1, 2) for t in kv32.split(kv_heads * dim, dim=-1))
    reference = reference_packed_attention(q32, k32, v32, start)
    reference.backward(grad.float())
    for name, got, want in (("out", out, reference), ("dq", q.grad, q32.grad), ("dkv", kv.grad, kv32.grad)):
        error = ((got.float() - want).norm() / want.norm()).item()
        assert error < 1e-2, (name, error)


def _norm_inputs(dtype: torch.dtype, hidden: int, rows: int = 1000):
    generator = torch.Generator(device="cuda").manual_seed(0)

    def tensor(*size, dtype=dtype, scale=1.0):
        return (scale * torch.randn(*size, device="cuda", generator=generator)).to(dtype).requires_grad_()

    return (tensor(4, rows // 4, hidden), tensor(4, rows // 4, hidden), 1 + tensor(hidden, scale=0.1).detach(),
            torch.randn(4, rows // 4, hidden, device="cuda", generator=generator).to(dtype),
            torch.randn(4, rows // 4, hidden, device="cuda", generator=generator).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [2048, 4096, 1000])
def test_fused_add_rms_norm_matches_autograd_through_the_torch_norm(dtype, hidden):
    """forgather::rms_norm with the residual add: the sum bit for bit, the norm within an ulp of the input dtype,
    the gradients of both inputs and the weight within rounding, for the hidden sizes of the 1.24B and 7B shapes
    and one that is not a power of two."""
    from forgather.models import fused_rms_norm, norm

    x, delta, weight, dy, ds = _norm_inputs(dtype, hidden)
    weight.requires_grad_()
    results = []
    for ops in (fused_rms_norm, norm):
        for t in (x, delta, weight):
            t.grad = None
        s, y = ops.add_rms_norm(x, delta, weight, 1e-5)
        torch.autograd.backward([y, s], [dy, ds])
        results.append([t.detach().float() for t in (s, y, x.grad, delta.grad, weight.grad)])
    (s, y, dx, ddelta, dweight), (s_ref, y_ref, dx_ref, _, dweight_ref) = results
    assert torch.equal(s, s_ref)
    assert torch.equal(dx, ddelta)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, **tolerance)
    torch.testing.assert_close(dx, dx_ref, **tolerance)
    assert ((dweight - dweight_ref).norm() / dweight_ref.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:  # within one bf16 ulp almost everywhere: the same roundings as autograd's
        assert ((y != y_ref).float().mean()).item() < 0.01


def test_compiled_fused_norms_take_views_with_gaps():
    """The fused norm ops under torch.compile on slices of wider tensors (rows with gaps, as fused projections
    give; the packed attention op failed on such views): the sum, the norm and every gradient as the torch
    norm's, compiled the same way."""
    from forgather.models import fused_rms_norm, norm

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = 512
    wide = torch.randn(2, 300, 3 * hidden, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)).to(torch.bfloat16)
    weight.requires_grad_()

    def step(ops, wide, weight):
        x, delta = wide[..., :hidden], wide[..., 2 * hidden:]
        s, y = ops.add_rms_norm(x, delta, weight, 1e-5)
        return (y.float().square().mean() + s.float().mean() + ops.rms_norm(delta, weight, 1e-5).float().mean())

    results = []
    for ops in (fused_rms_norm, norm):
        wide.grad = weight.grad = None
        loss = torch.compile(functools.partial(step, ops), fullgraph=True)(wide, weight)
        loss.backward()
        torch.cuda.synchronize()
        results.append((loss.detach(), wide.grad.float(), weight.grad.float()))
    for name, got, want in zip(("loss", "dwide", "dweight"), *results):
        assert ((got - want).norm() / want.norm()).item() < 1e-2, name


def test_compiled_model_with_fused_norms_trains_like_the_torch_norms():
    """RMSNorm(fused=True) under whole-model compile (fullgraph: the ops trace without a break): logits, the
    loss's gradient of a norm weight and of a projection agree with the torch norms' in bf16."""
    results = {}
    for fused in (True, False):
        built = wide_model("sdpa", fused_norm=fused)
        step = torch.compile(built, fullgraph=True) if fused else built
        logits = step(token_ids())
        logits.float().logsumexp(-1).mean().backward()
        layer = built.layers[1]
        results[fused] = (logits.detach().float(), layer.feedforward_norm.weight.grad.float(),
                          layer.attention.q_proj.weight.grad.float())
    torch.testing.assert_close(results[True][0], results[False][0], **TOLERANCE[torch.bfloat16])
    for got, want in zip(results[True][1:], results[False][1:]):
        assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_the_residual_stream_carried_as_a_pair_trains_like_one_tensor():
    """In training the stream passes between layers as (x, delta), added inside the next fused norm's kernel
    (CausalLM carry_residual): with each layer compiled, as compile=true runs them, the logits and every
    gradient agree with the stream as one tensor (the fused sum is the add, bit for bit; the norms within bf16)."""
    results = {}
    for carried in (True, False):
        built = wide_model("packed", fused_norm=True)
        built.carry_residual = carried
        for layer in built.layers:
            layer.compile()
        results[carried] = logits_and_grads(built)
    assert_trains_alike(results[True], results[False], 1e-2)


@pytest.mark.parametrize("loss_name", ["fused", "naive"])
def test_the_sparse_tied_embedding_gradient_trains_like_the_dense_one(loss_name):
    """On CUDA a tied model's head hands its gradient to the lookup, which adds the looked-up rows into it in place
    (CausalLM sparse_tied_grad=True, embedding.TiedGradient): in bf16 under the fused loss (whose gradient is
    ready in forward) and under the plain one, every gradient agrees with the dense lookup's, the weight's is the
    head's own tensor, and the backward never waits for the device."""
    from forgather.loss import get_loss

    results = {}
    for sparse in (True, False):
        built = wide_model("packed", fused_norm=True).train()
        built.sparse_tied_grad = sparse
        lookups = []
        built.embed.register_forward_hook(lambda m, a, out: lookups.append(type(out.grad_fn).__name__))
        ids = token_ids()
        hidden = built.hidden_states(ids, packed_positions())
        head = built.lm_head_weight
        handed = []
        head.register_hook(lambda grad: handed.append(grad.data_ptr()))
        loss = get_loss(loss_name)(hidden, head, ids)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if sparse else "default")  # torch's dense lookup is not ours
        try:
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (lookups == ["_LookupBackward"]) is sparse
        if sparse:
            assert handed == [built.embed.weight.grad.data_ptr()]
        results[sparse] = (loss.detach().float(), [p.grad.float() for p in built.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for got, want in zip(results[True][1], results[False][1]):
        assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 300, 8, 2, 64), (1, 70, 4, 4, 80)], ids=["gqa-64", "mha-80"])
def test_fused_rotary_matches_its_references(dtype, shape):
    """forgather::rotary_qkv and its backward against the torch references (reference_rotary_qkv, and
    reference_rotary_qkv_backward, which the CPU tests hold to autograd's gradient): fp32 within float rounding,
    bf16 within one ulp; lengths not a multiple of the token block, and a head dim whose half is not a power of
    two; the gradients strided as the attention's backward hands them."""
    from forgather.models.fused_rotary import reference_rotary_qkv, reference_rotary_qkv_backward, rotary_qkv

    batch, length, heads, kv_heads, dim = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, length, (heads + 2 * kv_heads) * dim, device="cuda", generator=generator).to(dtype)
    positions = torch.cat([torch.arange(length - 30), torch.arange(30)]).repeat(batch, 1).cuda()
    cos, sin = RotaryEmbedding(dim, theta=500000.0)(positions)
    qkv.requires_grad_()
    got = rotary_qkv(qkv, cos, sin, heads, kv_heads)
    want = reference_rotary_qkv(qkv.detach(), cos, sin, heads, kv_heads)
    grads = [torch.randn(t.shape, device="cuda", generator=generator).to(dtype).transpose(1, 2).contiguous()
             .transpose(1, 2) for t in want]
    torch.autograd.backward(got, grads)
    want_grad = reference_rotary_qkv_backward(*grads, cos, sin)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(a.float(), b.float(), **tolerance)
    assert torch.equal(got[2], want[2])  # v copied
    torch.testing.assert_close(qkv.grad.float(), want_grad.float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("halves", [False, True], ids=["two", "halves"])
def test_fused_swiglu_matches_its_reference(dtype, halves):
    """forgather::swiglu and its backward against autograd through reference_swiglu (which the CPU tests hold
    to the kernels' closed form): fp32 within a few ulps (the sigmoid's exp2 and division are not IEEE-rounded),
    bf16 within one ulp; rows that do not fill their last program; gate and up as two tensors, or as the halves
    of one gate/up product (views with a row stride twice their width)."""
    from forgather.models.fused_swiglu import reference_swiglu, swiglu

    generator = torch.Generator(device="cuda").manual_seed(0)
    shape, cols = (3, 301), 2048 + 96

    def inputs():
        if halves:
            product = (3 * torch.randn(*shape, 2 * cols, device="cuda", generator=generator)).to(dtype)
            product.requires_grad_()
            return [product], product.chunk(2, dim=-1)
        gate, up = ((3 * torch.randn(*shape, cols, device="cuda", generator=generator)).to(dtype).requires_grad_()
                    for _ in range(2))
        return [gate, up], (gate, up)

    leaves, (gate, up) = inputs()
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    twin_gate, twin_up = twins[0].chunk(2, dim=-1) if halves else twins
    dh = torch.randn(*shape, cols, device="cuda", generator=generator).to(dtype)
    got, want = swiglu(gate, up), reference_swiglu(twin_gate, twin_up)
    got.backward(dh)
    want.backward(dh)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **tolerance)


def test_compiled_layers_with_the_fused_swiglu_train_like_the_torch_gate():
    """SwiGLU(fused=True) takes forgather::swiglu on CUDA; with each layer compiled (as compile=true runs them),
    the logits and every gradient agree with the same model whose gate inductor compiles."""
    results = {}
    for op in (True, False):
        built = wide_model("packed", fused_norm=True, fused_projections="qkv", fused_swiglu=op)
        assert all((layer.feedforward._swiglu is not None) is op for layer in built.layers)
        for layer in built.layers:
            layer.compile()
        results[op] = logits_and_grads(built)
    assert_trains_alike(results[True], results[False], 1e-2)


def test_compiled_layers_with_the_fused_rotary_train_like_the_torch_rotation():
    """Attention with q/k/v as one product takes forgather::rotary_qkv on CUDA; with each layer compiled (as
    compile=true runs them) and packed attention, the logits and every gradient agree with the same model whose
    layers rotate in torch."""
    results = {}
    for op in (True, False):
        built = wide_model("packed", fused_norm=True, fused_projections="qkv")
        for layer in built.layers:
            assert layer.attention._rotary_qkv is not None
            if not op:
                layer.attention._rotary_qkv = None
            layer.compile()
        results[op] = logits_and_grads(built)
    assert_trains_alike(results[True], results[False], 1e-2)
