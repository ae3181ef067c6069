"""The serving engine on the CPU: continuous batching over slot caches gives the simple loop's tokens (greedy
and seeded, alone or batched) for a Forgather and a Hugging Face Llama directory; cancellation frees the
slot; the queue is bounded; incremental detokenization and stop strings across token boundaries; and the
HTTP app over the engine (429, 400, disconnects)."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
import torch
import transformers

from forgather.data.tokenizer import build_bpe_tokenizer
from forgather.models.export import build_model, save_model
from forgather.serve.app import create_app
from forgather.serve.backend import Backend, SamplingParams
from forgather.serve.engine import Engine
from forgather.serve.scheduler import QueueFull, Request, Scheduler
from forgather.serve.text import IncrementalDetokenizer, TextStream, held_back
from helpers.tiny_lm import tiny_tree
from test_serve import serving

CONTEXT = 64
PROMPTS = ["once upon a time", "there was", "a tiny model", "upon a time there was a tiny model once"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(["once upon a time there was a tiny model"] * 4, vocab_size=300)


def load_backend(directory, tokenizer) -> Backend:
    """The model directory with the tokenizer saved beside it, loaded, with no stop token (every completion
    runs to max_tokens)."""
    tokenizer.save_pretrained(directory)
    loaded = Backend.load(directory, context_length=CONTEXT)
    loaded.stop_token_ids = set()
    return loaded


def forgather_backend(directory, tokenizer, **tree_options) -> Backend:
    tree = tiny_tree(len(tokenizer), **tree_options)
    torch.manual_seed(0)
    save_model(build_model(tree).eval(), tree, directory, "tiny")
    return load_backend(directory, tokenizer)


def hugging_face_backend(directory, tokenizer, model_type: str = "llama", **config) -> Backend:
    """A tiny random model of `model_type` (weights ~ N(0, 0.3), norms ~ N(1, 0.3): far from initialization)."""
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.3)
    model.save_pretrained(directory)
    return load_backend(directory, tokenizer)


@pytest.fixture(scope="module", params=["forgather", "llama"])
def backend(request, tmp_path_factory, tokenizer) -> Backend:
    """A loaded tiny model directory of either kind."""
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "forgather":
        return forgather_backend(directory, tokenizer)
    return hugging_face_backend(directory, tokenizer)


class Collector:
    """A request's deliveries: tokens, then the finish reason; `done` is set at the end."""

    def __init__(self):
        self.tokens, self.finish, self.done = [], None, threading.Event()

    def __call__(self, item):
        if isinstance(item, int):
            self.tokens.append(item)
        else:
            self.finish = item
            self.done.set()


def run_engine(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[Collector]:
    collectors = [Collector() for _ in prompts]
    for ids, p, collector in zip(prompts, params, collectors):
        engine.submit(ids, p, collector)
    for collector in collectors:
        assert collector.done.wait(60), "the engine did not finish"
    return collectors


def simple_loop(backend: Backend, ids: list[int], params: SamplingParams) -> list[int]:
    return list(backend.tokens(ids, params))


@pytest.fixture(params=[False, True], ids=["serial", "lookahead"])
def engine(backend, request):
    """The engine both ways: each step waited for, and (what a GPU runs) the next greedy step queued ahead."""
    engine = Engine(backend.model, backend.stop_token_ids, slots=4, context_length=CONTEXT, prefill_chunk=3,
                    lookahead=request.param)
    yield engine
    engine.close()


def test_greedy_tokens_equal_the_simple_loop_alone_and_batched(backend, engine):
    prompts = [backend.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=12 + i, temperature=0.0) for i in range(len(prompts))]
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    alone = [run_engine(engine, [ids], [p])[0].tokens for ids, p in zip(prompts, params)]
    batched = run_engine(engine, prompts * 2, params * 2)  # more requests than slots: some wait for a slot
    assert alone == expected
    assert [c.tokens for c in batched] == expected * 2
    assert {c.finish for c in batched} == {"length"}


@pytest.mark.parametrize("attention, matmul", [("matmul", "torch"), ("triton", "triton"), ("sdpa", "torch"), ("reduce", "triton"), ("triton", "fused"),
                                               ("triton", "fused_all"), ("triton", "fused_down")])
def test_decoding_goes_through_the_fused_decoder_whose_logits_are_the_modules_step(backend, attention, matmul):
    """Both kinds decode through FusedDecoder (its attention and products either way; the Triton ones run their
    torch semantics on a CPU); from the same cache it gives the modules' step's logits, and the model's own
    q/k/v and gate/up weights are views of its fused ones (not a second copy)."""
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT, fused_attention=attention,
                    fused_matmul=matmul)
    try:
        assert engine.fused is not None and (engine.fused.attention, engine.fused.matmul) == (attention, matmul)
        run_engine(engine, [backend.encode(p) for p in PROMPTS[:3]], [SamplingParams(max_tokens=5, temperature=0.0)] * 3)
        ids, positions = torch.tensor([5, 7, 11, 0]), torch.tensor([9, 3, 12, engine.cache.scratch])
        with torch.inference_mode():
            keys = engine.key_buckets[0]
            modules = engine._forward(ids[:, None], positions[:, None], slice(0, 4), keys)
            fused, greedy = engine.fused(ids, positions, torch.arange(keys))
        torch.testing.assert_close(fused[:3], modules[:3], rtol=1e-5, atol=1e-5)
        assert greedy.tolist()[:3] == modules.argmax(-1).tolist()[:3]
        # the cache holds each layer's keys and values as views of one pair: one scatter writes both
        assert engine.cache.keys[0].data_ptr() == engine.cache.pairs[0].data_ptr()
        assert engine.cache.values[0].data_ptr() == engine.cache.pairs[0][1].data_ptr()
    finally:
        engine.close()
    layer = backend.model.model.layers[0]
    q_proj = layer.attention.q_proj if hasattr(layer, "attention") else layer.self_attn.q_proj
    assert q_proj.weight.untyped_storage().data_ptr() == engine.fused.layers[0].qkv.untyped_storage().data_ptr()


def test_steps_of_more_rows_than_the_product_kernels_take_run_torchs_products(backend):
    """The fused products ("fused", the GPU default under PDL) serve steps of up to SKINNY_ROWS rows; a larger
    batch's step runs the "torch" products (which inductor fuses with the norms), computing the same logits.
    On a CPU, without PDL, the engine's own choice is "torch" throughout."""
    from forgather.serve.decode_attention import SKINNY_ROWS

    default = Engine(backend.model, set(), slots=2, context_length=CONTEXT)
    default.close()
    assert default.fused.matmul == "torch"
    rows = SKINNY_ROWS + 1
    engine = Engine(backend.model, set(), slots=rows, context_length=CONTEXT, cuda_graphs=False, fused_matmul="fused")
    try:
        seen = []
        layer_fn = engine.fused.layer_fn
        engine.fused.layer_fn = lambda *args: seen.append(args[14]) or layer_fn(*args)  # decode_layer's matmul
        keys = torch.arange(engine.key_buckets[0])
        with torch.inference_mode():
            for size in (2, rows):
                ids, positions = torch.arange(1, size + 1), torch.full((size,), engine.cache.scratch)
                seen.clear()
                logits, _ = engine.fused(ids, positions, keys)
                assert set(seen) == {"fused" if size <= SKINNY_ROWS else "torch"}
                modules = engine._forward(ids[:, None], positions[:, None], slice(0, size), len(keys))
                torch.testing.assert_close(logits, modules, rtol=1e-5, atol=1e-5)
    finally:
        engine.close()


def test_kernels_launch_without_pdl_on_a_cpu_and_under_the_interpreter(monkeypatch):
    """Programmatic dependent launch is a GPU's (compute capability 9.0): never on a CPU, nor under Triton's
    interpreter even when asked for (its kernels then take the PDL constant False)."""
    from forgather.serve import decode_attention as da

    assert not da.dependent_launch(torch.device("cpu"))
    monkeypatch.setattr(da, "PDL", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not da.dependent_launch(torch.device("cpu"))
    assert da._pdl_options(torch.device("cpu")) == {}


def test_a_decode_step_ends_by_writing_the_next_steps_inputs_and_its_tokens_for_the_host():
    """advance_inputs (the last thing a decode step does, inside its CUDA graph): ids <- the greedy tokens,
    positions move on by one except the scratch position of rows without a request, and the tokens go to the
    host buffer; buffers of other shapes are refused."""
    from forgather.serve.decode_attention import advance_inputs

    scratch = 64
    inputs = torch.tensor([[5, 0, 7], [10, scratch, 63]])
    host = torch.zeros(3, dtype=torch.long)
    advance_inputs(inputs, torch.tensor([11, 12, 13]), scratch, host)
    assert inputs.tolist() == [[11, 12, 13], [11, scratch, 64]]
    assert host.tolist() == [11, 12, 13]
    with pytest.raises(ValueError, match=r"inputs \[2, 3\] and host \[3\]"):
        advance_inputs(inputs, torch.tensor([1, 2, 3]), scratch, torch.zeros(4, dtype=torch.long))


def test_the_advance_kernels_run_only_where_triton_does(monkeypatch):
    """Without triton (or on a CPU) the step's end runs its torch semantics; under Triton's interpreter, the
    kernels."""
    import functools
    import importlib.util

    from forgather import triton_support
    from forgather.serve import decode_attention as da

    assert not da._advance_kernels(torch.device("cpu"))
    # a lookup cache of this test's own, gone with it
    monkeypatch.setattr(triton_support, "_triton_runs", functools.cache(triton_support._triton_runs.__wrapped__))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not da._advance_kernels(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert da._advance_kernels(torch.device("cpu"))


def test_the_steps_greedy_ids_are_argmaxs_with_its_ties():
    """greedy_advance (the fused step's end): argmax's index of the logits, the first of tied maxima across
    chunks and within one, then the advance."""
    from forgather.serve.decode_attention import greedy_advance
    from forgather.serve.fused import ARGMAX_CHUNK

    logits = torch.randn(3, 2 * ARGMAX_CHUNK + 5)
    logits[0, ARGMAX_CHUNK + 1] = logits[0, 2 * ARGMAX_CHUNK + 2] = 9.0
    logits[1, 3] = logits[1, 4] = 9.0
    inputs = torch.tensor([[0, 0, 0], [4, 64, 5]])
    host = torch.zeros(3, dtype=torch.long)
    greedy = greedy_advance(logits, inputs, 64, host)
    assert greedy.tolist() == logits.argmax(-1).tolist() == host.tolist() == inputs[0].tolist()
    assert greedy[:2].tolist() == [ARGMAX_CHUNK + 1, 3] and inputs[1].tolist() == [5, 64, 6]


def test_the_default_products_follow_pdl_and_the_models_width(monkeypatch):
    """Where PDL runs, our fused products with our down product are the default below a hidden size of 4096
    (1.03-1.04x "fused" at 1.24B on the H200, itself 1.02x cuBLAS's) and cuBLAS's from it (0.94x at 7B);
    without PDL or our attention kernel, cuBLAS's."""
    from forgather.serve import decode_attention as da
    from forgather.serve.engine import _default_matmul

    gpu = torch.device("cuda")
    monkeypatch.setattr(da, "dependent_launch", lambda device: True)
    assert _default_matmul(gpu, "triton", 2048) == "fused_down"
    assert _default_matmul(gpu, "triton", 4096) == "torch"
    assert _default_matmul(gpu, "matmul", 2048) == "torch"
    monkeypatch.setattr(da, "dependent_launch", lambda device: False)
    assert _default_matmul(gpu, "triton", 2048) == "torch"


def test_the_pdl_trigger_setting_reaches_the_kernels_or_is_refused(monkeypatch):
    """decode_attention.PDL_TRIGGER: "start" lets the next kernel launch right after a kernel's own wait (the
    default), "end" after its loads (the constant PDL_EARLY); anything else is an error that says the choices."""
    from forgather.serve import decode_attention as da

    gpu = torch.device("cuda")
    monkeypatch.setattr(da, "dependent_launch", lambda device: True)
    assert da._pdl_options(gpu) == dict(PDL=True, PDL_EARLY=True, launch_pdl=True)
    assert da._pdl_options(gpu, release_late=True)["PDL_EARLY"] is False  # before a split-K grid of ours
    monkeypatch.setattr(da, "PDL_TRIGGER", "end")
    assert da._pdl_options(gpu)["PDL_EARLY"] is False
    monkeypatch.setattr(da, "PDL_TRIGGER", "late")
    with pytest.raises(ValueError, match="'start' or 'end'"):
        da._pdl_options(gpu)


@pytest.mark.parametrize("matmul, late", [("fused", False), ("fused_down", True), ("fused_all", True)])
def test_our_kernels_release_late_exactly_where_our_down_product_runs(monkeypatch, matmul, late):
    """Under PDL a kernel that lets the next one launch at its start fills the SMs with that kernel's waiting
    programs: where the down product is ours (a split-K grid), every kernel of ours releases after its loads."""
    from forgather.serve import fused
    from forgather.serve.decode_attention import workspace as decode_workspace

    calls = []

    def recording(name, op):
        def call(*args, **kwargs):
            calls.append((name, kwargs.get("release_late", False)))
            return op(*args, **kwargs)
        return call

    for name in ("skinny_norm_linear", "skinny_linear", "decode_attention"):
        monkeypatch.setattr(fused, name, recording(name, getattr(fused, name)))
    hidden, heads, kv_heads, head_dim, inner = 32, 4, 2, 8, 48

    def weight(*shape):
        return torch.randn(*shape) * 0.1

    w = fused.LayerWeights(attention_norm=torch.ones(hidden), qkv=weight((heads + 2 * kv_heads) * head_dim, hidden),
                           qkv_bias=None, q_norm=None, k_norm=None, o=weight(hidden, heads * head_dim), o_bias=None,
                           feedforward_norm=torch.ones(hidden), gate_up=weight(2 * inner, hidden), gate_up_bias=None,
                           down=weight(hidden, inner), down_bias=None)
    cache = torch.zeros(2, 1, kv_heads, 17, head_dim)
    x, delta = torch.randn(1, hidden), torch.zeros(1, hidden)
    angles = torch.zeros(1, head_dim)
    fused.decode_layer(x, delta, angles.cos(), angles.sin(), torch.tensor([3]), torch.ones(1, 16, dtype=torch.bool),
                       cache, w, heads, kv_heads, 1e-5, 1e-6, attention="triton", matmul=matmul,
                       workspace=decode_workspace(1, kv_heads, head_dim, 17, "cpu"))
    expected = [("skinny_norm_linear", late), ("decode_attention", late)]
    expected += [("skinny_linear", late)] if matmul == "fused_all" else []
    expected += [("skinny_norm_linear", late)] + ([("skinny_linear", late)] if late else [])
    assert calls == expected


@pytest.mark.parametrize("vocab", [5 * 1024, 3000, 1024, 7])
def test_the_decoders_two_stage_argmax_is_argmax_ties_included(vocab):
    """chunked_argmax (the decode step's greedy token) gives torch.argmax's index: the first of tied maxima,
    whether they share a chunk or not, for vocabularies that fill their last chunk or not."""
    from forgather.serve.fused import ARGMAX_CHUNK, chunked_argmax

    torch.manual_seed(0)
    logits = torch.randn(6, vocab)
    top = logits.max() + 1
    logits[1, [vocab - 1]] = top                          # the maximum in the last, padded chunk
    logits[2, [vocab // 2, vocab - 1]] = top              # tied in two chunks
    logits[3, [0, min(1, vocab - 1)]] = top               # tied within the first chunk
    logits[4] = 0.0                                       # all tied: index 0
    logits[5, [min(ARGMAX_CHUNK + 3, vocab - 1), min(2 * ARGMAX_CHUNK, vocab - 1)]] = top
    assert chunked_argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert chunked_argmax(logits.to(torch.bfloat16)).tolist() == logits.to(torch.bfloat16).argmax(-1).tolist()


@pytest.mark.slow
def test_a_compiled_prefill_decodes_like_the_simple_loop_and_compiles_only_at_startup(backend):
    """compile_prefill: the prompts' forward passes through torch.compile, compiled while the engine starts
    for the shapes dynamo tells apart; requests of other prompt lengths and counts (chunked, batched, one
    token) then compile nothing more, and give the simple loop's greedy tokens. (~1 minute of compiling.)"""
    from torch._dynamo.utils import counters

    prompts = [backend.encode(p) for p in PROMPTS] + [[5]]
    params = [SamplingParams(max_tokens=6, temperature=0.0)] * len(prompts)
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    engine = Engine(backend.model, set(), slots=3, context_length=CONTEXT, prefill_chunk=5, compile_prefill=True)
    try:
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
        assert [run_engine(engine, [ids], [p])[0].tokens for ids, p in zip(prompts, params)] == expected
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        engine.close()


def test_the_startup_prefills_write_only_the_scratch_position_and_change_no_tokens(backend):
    """warm_prefill (on by default on a GPU): the prefill runs once at startup at typical shapes; its rows sit
    at the scratch position, so no cache position a request reads is written, and requests then decode
    exactly as the simple loop does."""
    from forgather.serve.engine import _typical_prefills

    assert _typical_prefills(32, 2048, 4096) == [(1, 2048), (1, 128), (2, 128), (4, 128), (8, 128), (16, 128)]
    assert _typical_prefills(3, 5, CONTEXT) == [(1, 5)]  # a chunk shorter than 128: rows that fit in it
    prompts = [backend.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=6, temperature=0.0)] * len(prompts)
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    engine = Engine(backend.model, set(), slots=3, context_length=CONTEXT, prefill_chunk=8, warm_prefill=True)
    try:
        scratch = engine.cache.scratch
        for pair in engine.cache.pairs:
            assert not pair[:, :, :, :scratch].any() and pair[:, 0, :, scratch].any()
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
    finally:
        engine.close()


def test_the_prefill_runs_without_cudnn_attention_and_puts_the_flags_back():
    """On a GPU the engine's prefill runs SDPA without cuDNN's kernel (it builds a plan per new shape): the
    wrapper turns cuDNN off for the call only, leaves the other kernels on, and restores the flags after a
    failing call too."""
    from forgather.serve.engine import _without_cudnn_attention

    seen = []

    def forward(fail=False):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        if fail:
            raise RuntimeError("boom")
        return torch.ones(1)

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        wrapped = _without_cudnn_attention(forward)
        assert wrapped().item() == 1.0
        with pytest.raises(RuntimeError, match="boom"):
            wrapped(fail=True)
        assert seen == [(False, True, True, True)] * 2
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["torch", "triton", "fused", "fused_all"])
def test_the_compiled_fused_decoder_decodes_like_the_simple_loop(backend, kernels):
    """What a GPU runs (the fused decoder through torch.compile, dynamic shapes, batch 1 and batches), here
    compiled for the CPU: the simple loop's greedy tokens, alone and batched; also with the Triton kernels'
    custom ops in the compiled graph (their torch semantics on a CPU). (~20 s of compiling each.)"""
    prompts = [backend.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10, temperature=0.0)] * len(prompts)
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT, compile=True,
                    fused_attention="matmul" if kernels == "torch" else "triton", fused_matmul=kernels)
    try:
        from forgather.serve.fused import decode_layer

        assert engine.fused is not None and engine.fused.layer_fn is not decode_layer  # compiled
        assert run_engine(engine, prompts[:1], params[:1])[0].tokens == expected[0]
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
    finally:
        engine.close()


@pytest.mark.slow
def test_the_compiled_layer_keeps_its_residual_adds_out_of_the_products():
    """In bf16 inductor would fold `x + x @ W.T` into addmm, which copies x into the product's output first
    (a device-to-device copy a layer on the H200); decode_layer's adds stay plain products (~10 s)."""
    from torch._inductor.utils import run_and_get_code

    from forgather.serve.fused import LayerWeights, decode_layer

    torch.manual_seed(0)
    hidden, heads, kv_heads, head_dim, inner = 64, 4, 2, 16, 128

    def weight(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16)

    weights = LayerWeights(weight(hidden), weight((heads + 2 * kv_heads) * head_dim, hidden), None, None, None,
                           weight(hidden, heads * head_dim), None, weight(hidden), weight(2 * inner, hidden), None,
                           weight(hidden, inner), None)
    cache = torch.zeros(2, 2, kv_heads, 33, head_dim, dtype=torch.bfloat16)
    x, positions = weight(1, hidden), torch.tensor([5])
    layer = torch.compile(decode_layer, fullgraph=True, dynamic=True)
    _, code = run_and_get_code(layer, x, torch.zeros_like(x), weight(1, head_dim), weight(1, head_dim), positions,
                               torch.arange(32)[None] <= positions[:, None], cache, weights, heads, kv_heads, 1e-5, 1e-5)
    assert "extern_kernels.mm(" in code[0] and "addmm" not in code[0]


@pytest.mark.parametrize("model_type, options", [
    ("qwen2", {}), ("qwen3", {}), ("mistral", {}), ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})])
def test_other_llama_family_models_decode_through_the_fused_decoder_like_the_simple_loop(
        model_type, options, tmp_path, tokenizer):
    """Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Llama's biases on every projection and Llama 3's
    rope scaling go through the fused decoder too."""
    backend = hugging_face_backend(tmp_path, tokenizer, model_type, head_dim=8, **options)
    prompts = [backend.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10, temperature=0.0)] * len(prompts)
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT)
    try:
        assert engine.fused is not None
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("attention", ["triton", "matmul"])
def test_the_rotary_is_a_table_of_every_cache_position_made_once(backend, attention):
    """The decode step computes no rotary: cos and sin come from tables of every cache position, made from the
    model's own rotary when the decoder is built (our attention kernel reads them at each row's position; the
    torch attentions index them), and the tokens are the simple loop's."""
    engine = Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused_attention=attention)
    try:
        cos, sin = engine.fused.rope_tables
        assert cos.shape == sin.shape == (engine.cache.scratch + 1, engine.fused.head_dim)
        assert engine.fused.table_rope == (attention == "triton")
        engine.fused.rope = lambda positions: pytest.fail("the step computed a rotary")
        ids = backend.encode(PROMPTS[2])
        greedy = SamplingParams(max_tokens=9, temperature=0.0)
        assert run_engine(engine, [ids], [greedy])[0].tokens == simple_loop(backend, ids, greedy)
    finally:
        engine.close()


def test_a_rope_that_reads_the_positions_on_the_host_is_served_by_the_simple_loop(tmp_path, tokenizer):
    """transformers' "dynamic" rope recomputes its frequencies from the step's positions on the host: no CUDA
    graph can hold that, so the server decodes one request at a time, and says why."""
    backend = hugging_face_backend(tmp_path, tokenizer, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.warns(UserWarning, match="rope_type 'dynamic' recomputes its frequencies"):
        backend.start_engine(2)
    assert backend.engine is None


def test_an_unknown_fused_attention_is_refused(backend):
    with pytest.raises(ValueError, match="attention='flash'; choose one of"):
        Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused=True, fused_attention="flash")
    with pytest.raises(ValueError, match="matmul='cutlass'; choose one of"):
        Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused=True, fused_matmul="cutlass")


def test_a_model_the_fused_decoder_cannot_run_decodes_through_its_modules(tmp_path, tokenizer):
    """A GELU MLP is not Llama-shaped: the engine decodes through the model's modules, with the same tokens;
    `fused=True` says why it cannot."""
    from forgather.serve.fused import UnsupportedModel

    backend = forgather_backend(tmp_path, tokenizer, feedforward="forgather.models.feedforward:GELUMLP")
    with pytest.raises(UnsupportedModel, match="another sublayer"):
        Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused=True)
    engine = Engine(backend.model, set(), slots=2, context_length=CONTEXT)
    try:
        assert engine.fused is None
        ids, params = backend.encode(PROMPTS[0]), SamplingParams(max_tokens=10, temperature=0.0)
        assert run_engine(engine, [ids], [params])[0].tokens == simple_loop(backend, ids, params)
    finally:
        engine.close()


def test_a_module_named_like_ours_that_computes_otherwise_is_caught_by_the_logits_check(tmp_path, tokenizer):
    """Classes are recognized by name (a Forgather directory's generated code carries copies of ours), so the
    engine checks the fused step's logits against the model's own before decoding through it."""
    from forgather.serve.fused import UnsupportedModel

    class RMSNorm(torch.nn.Module):  # our name, a LayerNorm's arithmetic
        def __init__(self, weight, eps):
            super().__init__()
            self.weight, self.eps = weight, eps

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight, None, self.eps)

    backend = forgather_backend(tmp_path, tokenizer)
    layer = backend.model.model.layers[1]
    layer.feedforward_norm = RMSNorm(layer.feedforward_norm.weight, layer.feedforward_norm.eps)
    with pytest.raises(UnsupportedModel, match="does not compute what the model's modules do"):
        Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused=True)
    engine = Engine(backend.model, set(), slots=2, context_length=CONTEXT)
    engine.close()
    assert engine.fused is None


def test_the_models_own_modules_decode_like_the_simple_loop_with_steps_queued_ahead(backend):
    """fused=False (a model the fused decoder does not take): the modules' step, its greedy ids and the next
    step's inputs written by advance_inputs, queued ahead like the fused step's."""
    engine = Engine(backend.model, set(), slots=4, context_length=CONTEXT, fused=False, lookahead=True)
    try:
        assert engine.fused is None
        prompts = [backend.encode(p) for p in PROMPTS]
        params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0.0) for i in range(len(prompts))]
        expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
    finally:
        engine.close()


@pytest.mark.parametrize("lookahead", [False, True])
def test_sequences_growing_past_a_key_window_decode_like_the_simple_loop(backend, lookahead):
    """Decode steps attend over the shortest window of 256, 512 ... cache positions holding every sequence
    (a step queued ahead picks the window of the positions it feeds)."""
    engine = Engine(backend.model, set(), slots=2, context_length=600, lookahead=lookahead)
    try:
        assert engine.key_buckets == [256, 512, 601]
        prompts = [backend.encode(PROMPTS[3]), backend.encode(PROMPTS[1])]
        params = [SamplingParams(max_tokens=270, temperature=0.0), SamplingParams(max_tokens=20, temperature=0.0)]
        expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
        assert [c.tokens for c in run_engine(engine, prompts, params)] == expected
    finally:
        engine.close()


def test_seeded_sampling_is_the_same_alone_and_batched(backend, engine):
    prompts = [backend.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=seed) for seed in range(len(prompts))]
    expected = [simple_loop(backend, ids, p) for ids, p in zip(prompts, params)]
    alone = run_engine(engine, prompts[:1], params[:1])[0].tokens
    batched = run_engine(engine, prompts, params)
    assert alone == expected[0]
    assert [c.tokens for c in batched] == expected
    assert expected[0] != expected[1]


def test_a_vanishing_temperature_or_top_p_samples_the_top_token_and_fails_no_other_request(backend, engine):
    """A temperature of 1e-39 made the logits infinite and a top_p of 1e-300 rounded to 0 in float32 (no token
    kept): the step's distribution was invalid and every request of the batch failed. Both are the most
    probable token now, and the greedy request beside them gives its text alone."""
    ids = backend.encode(PROMPTS[0])
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    alone = run_engine(engine, [ids], [greedy])[0]
    extreme = [SamplingParams(max_tokens=10, temperature=1e-39, seed=1),
               SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-300, seed=1)]
    together = run_engine(engine, [ids] * 3, [greedy, *extreme])
    assert [c.finish for c in together] == ["length"] * 3
    assert backend.decode(together[0].tokens) == backend.decode(alone.tokens)
    assert [c.tokens for c in together[1:]] == [alone.tokens] * 2


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_stop_token_finishes_the_request_with_stop(backend, lookahead):
    """(With lookahead the step queued after the stop token is dropped, and the next request decodes like the
    simple loop in the slot it wrote.)"""
    ids = backend.encode(PROMPTS[0])
    greedy = simple_loop(backend, ids, SamplingParams(max_tokens=8, temperature=0.0))
    engine = Engine(backend.model, {greedy[3]}, slots=2, context_length=CONTEXT, lookahead=lookahead)
    try:
        result = run_engine(engine, [ids], [SamplingParams(max_tokens=8, temperature=0.0)])[0]
        other = backend.encode(PROMPTS[1])
        again = run_engine(engine, [other], [SamplingParams(max_tokens=8, temperature=0.0)])[0]
    finally:
        engine.close()
    assert result.tokens == greedy[:greedy.index(greedy[3])] and result.finish == "stop"
    expected = simple_loop(backend, other, SamplingParams(max_tokens=8, temperature=0.0))
    if greedy[3] in expected:
        expected = expected[:expected.index(greedy[3])]
    assert again.tokens == expected


def test_lookahead_queues_each_greedy_step_before_reading_the_one_before(backend, monkeypatch):
    """One request of 10 greedy tokens: the first comes from prefill, then 9 decode steps, each launched once;
    all but the first were queued ahead (fed on the device) and used, none past the last token. With a
    sampled request nothing is queued ahead."""
    engine = Engine(backend.model, set(), slots=2, context_length=CONTEXT, lookahead=True)
    launches = []
    launch = engine._launch
    monkeypatch.setattr(engine, "_launch", lambda *args, **kwargs: launches.append(args[2]) or launch(*args, **kwargs))
    try:
        ids = backend.encode(PROMPTS[0])
        greedy = SamplingParams(max_tokens=10, temperature=0.0)
        assert run_engine(engine, [ids], [greedy])[0].tokens == simple_loop(backend, ids, greedy)
        assert launches == [0] + [1] * 8 and engine.ahead is None
        launches.clear()
        run_engine(engine, [ids], [SamplingParams(max_tokens=10, temperature=1.0, seed=1)])
        assert launches == [0] * 9
    finally:
        engine.close()


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_cancelling_frees_the_slot_for_the_next_request(backend, engine):
    ids = backend.encode(PROMPTS[0])
    long = Collector()
    request = engine.submit(ids, SamplingParams(max_tokens=CONTEXT - len(ids), temperature=0.0), long)
    wait_for(lambda: long.tokens)
    engine.cancel(request)
    wait_for(lambda: len(engine.scheduler.free) == engine.slots)
    assert request.slot is None and long.finish is None and len(long.tokens) < CONTEXT - len(ids)
    assert run_engine(engine, [ids], [SamplingParams(max_tokens=3, temperature=0.0)])[0].finish == "length"


def test_the_queue_is_bounded_beyond_the_slots():
    scheduler = Scheduler(slots=2, max_waiting=1, prefill_chunk=8)
    requests = [Request([1], None, print) for _ in range(4)]
    for request in requests[:3]:
        scheduler.submit(request)
    with pytest.raises(QueueFull, match="retry later"):
        scheduler.submit(requests[3])
    scheduler.cancel(requests[0])
    scheduler.plan(block=False)  # the cancelled request leaves: room for one more
    scheduler.submit(requests[3])


def test_prefill_is_chunked_while_others_decode():
    scheduler = Scheduler(slots=2, max_waiting=4, prefill_chunk=3)
    first, second = Request([1] * 5, None, print), Request([1] * 7, None, print)
    scheduler.submit(first)
    assert scheduler.plan().prefill == [(first, 0, 5)]  # nothing decodes: the whole prompt at once
    scheduler.prefilled(first, 5)
    scheduler.submit(second)
    plan = scheduler.plan()
    assert plan.prefill == [(second, 0, 3)] and plan.decode == [first]
    assert (second.slot, first.slot) == (1, 0)


def test_one_step_prefills_several_prompts_within_the_budget():
    scheduler = Scheduler(slots=4, max_waiting=4, prefill_chunk=8)
    requests = [Request([1] * length, None, print) for length in (4, 3, 9)]
    for request in requests:
        scheduler.submit(request)
    assert scheduler.plan().prefill == [(requests[0], 0, 4), (requests[1], 0, 3), (requests[2], 0, 1)]


# --- text -------------------------------------------------------------------------------------------------


def test_the_mailbox_wakes_the_event_loop_once_for_a_batch_of_tokens():
    """Tokens posted from the engine's thread reach their queues in order, with one loop wake-up for all
    that arrive before the loop runs (not one system call per token)."""
    import asyncio

    from forgather.serve.app import Mailbox

    loop = asyncio.new_event_loop()
    wakeups = []
    original = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: wakeups.append(args) or original(*args)
    try:
        mailbox = Mailbox(loop)
        queues = [asyncio.Queue(), asyncio.Queue()]
        poster = threading.Thread(target=lambda: [mailbox.post(queues[i % 2], i) for i in range(100)])
        poster.start()
        poster.join()

        async def drain():
            await asyncio.sleep(0)
            return [[q.get_nowait() for _ in range(q.qsize())] for q in queues]

        assert loop.run_until_complete(drain()) == [list(range(0, 100, 2)), list(range(1, 100, 2))]
        assert len(wakeups) == 1
        mailbox.post(queues[0], "more")  # after a flush, the next item wakes the loop again
        assert len(wakeups) == 2 and loop.run_until_complete(queues[0].get()) == "more"
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        mailbox.post(queues[0], 1)


def test_incremental_detokenization_equals_decoding_everything(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    text = "once upon a time: é, 漢字 and 🙂 there was"
    rng = random.Random(0)
    for ids in [tokenizer.encode(text)] + [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(20)]:
        detokenizer = IncrementalDetokenizer(decode)
        pieces = "".join(detokenizer.add(token) for token in ids) + detokenizer.rest()
        assert pieces == decode(ids).rstrip("\ufffd")


def test_a_stop_string_across_token_boundaries_ends_the_text_before_it(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    ids = tokenizer.encode("once upon a time there was")
    stop = "n a ti"  # spans the tokens of "upon", " a" and " time"
    assert not any(stop in decode([token]) for token in ids)
    stream = TextStream(decode, (stop,))
    deltas = []
    for token in ids:
        if (delta := stream.push(token)) is not None:
            deltas.append(delta)
            if delta.finish_reason:
                break
    assert "".join(d.text for d in deltas) == "once upo"
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_the_held_back_text_is_the_longest_end_that_starts_a_stop_string():
    """held_back looks only at the last len(stop) - 1 characters; it gives what comparing every length gave."""
    def every_length(text: str, stop: tuple[str, ...]) -> int:
        return max((n for s in stop for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])),
                   default=0)

    cases = [("once upon a ti", ("a time",)), ("aaaa", ("aab", "ab")), ("xyz", ("z",)), ("", ("abc",)),
             ("abab", ("ababc", "bab")), ("abc", ("abc",)), ("ab", ())]
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc "])
        word = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
        cases.append((word(rng.randrange(30)), tuple(word(rng.randrange(1, 12)) for _ in range(rng.randrange(4)))))
    assert [held_back(text, stop) for text, stop in cases] == [every_length(text, stop) for text, stop in cases]
    assert held_back("once upon a ti", ("a time",)) == 4


# --- the HTTP app over the engine ------------------------------------------------------------------------


@pytest.fixture
def engine_server(backend):
    """The app over an engine of one slot and no waiting room, taking 20 ms a step; (url, engine, steps),
    steps listing the decode batches run so far."""
    backend.start_engine(1, max_waiting=0)
    steps, run_step = [], backend.engine.run_step

    def slow_step(plan):
        time.sleep(0.02)
        steps.append(len(plan.decode))
        run_step(plan)

    backend.engine.run_step = slow_step
    with serving(create_app(backend, "m")) as url:
        yield url, backend.engine, steps
    backend.engine.close()
    backend.engine = None


def test_app_over_the_engine_gives_the_simple_loops_text(engine_server, backend):
    url, *_ = engine_server
    ids = backend.encode(PROMPTS[0])
    response = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": "m", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0})
    tokens = simple_loop(backend, ids, SamplingParams(max_tokens=10, temperature=0.0))
    expected = backend.decode(tokens).rstrip("\ufffd")  # a last partial character is not sent
    assert response.json()["choices"][0]["text"] == expected


def test_app_over_the_engine_answers_429_when_full_and_frees_a_left_stream(engine_server):
    url, engine, steps = engine_server
    body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)  # the one slot is taken (closing `lines` would hang up)
        busy = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=30)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        del lines
    wait_for(lambda: engine.scheduler.outstanding == 0)  # the client left: its slot is free
    assert len(steps) < (CONTEXT - 8) // 2  # long before the completion would have ended
    again = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
    assert again.json()["usage"]["completion_tokens"] == 2


def test_app_over_the_engine_refuses_a_prompt_longer_than_the_cache(engine_server):
    url, *_ = engine_server
    response = httpx.post(f"{url}/v1/completions", timeout=30,
                          json={"model": "m", "prompt": "once upon a time " * CONTEXT, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


# --- `forgather inf server --engine` ------------------------------------------------------------------------


@pytest.mark.parametrize("flags, engine", [([], torch.cuda.is_available()), (["--engine", "on"], True),
                                           (["--engine", "off"], False), (["--device-map", "auto"], False)])
def test_the_server_uses_the_engine_on_a_gpu_unless_told(monkeypatch, tmp_path, capsys, flags, engine):
    from forgather.cli import inf

    def load(*args, **kwargs):
        raise FileNotFoundError(f"load engine={kwargs['engine']} slots={kwargs['max_num_seqs']}")

    monkeypatch.setattr(Backend, "load", load)
    assert inf.main(["server", "-m", str(tmp_path), "--port", "0", "--max-num-seqs", "3", *flags]) == 2
    assert f"load engine={engine} slots=3" in capsys.readouterr().err


def test_the_server_freezes_what_it_loaded_before_it_serves(monkeypatch, tmp_path):
    """A full collection walks every tracked object; what the server loaded lives as long as it does, so it is
    frozen (gc.freeze) before the first request, and a collection during streaming walks only newer objects."""
    import gc
    import types

    import uvicorn

    from forgather.serve import server

    frozen = []
    monkeypatch.setattr(Backend, "load", lambda *args, **kwargs: types.SimpleNamespace(engine=None))
    monkeypatch.setattr("forgather.serve.app.create_app", lambda *args: "app")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: frozen.append(gc.get_freeze_count()))
    try:
        server.serve(str(tmp_path), port=0)
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 0


@pytest.mark.parametrize("engine", [True, False])
def test_with_the_engine_the_server_shortens_the_gil_switch_interval_while_it_serves(monkeypatch, tmp_path, engine):
    """The engine's thread needs the GIL between two steps; while the event loop streams, Python hands it over
    after the switch interval (5 ms by default), so the server shortens it, and puts it back when it stops."""
    import sys
    import types

    import uvicorn

    from forgather.serve import server

    seen, before = [], sys.getswitchinterval()
    loaded = types.SimpleNamespace(engine=object() if engine else None)
    monkeypatch.setattr(Backend, "load", lambda *args, **kwargs: loaded)
    monkeypatch.setattr("forgather.serve.app.create_app", lambda *args: "app")
    monkeypatch.setattr(uvicorn.Server, "run",
                        lambda self, sockets: seen.append((sys.getswitchinterval(), self.config.http)))
    try:
        server.serve(str(tmp_path), port=0, switch_interval=0.0007, http="h11")
    finally:
        import gc

        gc.unfreeze()
    assert seen == [(pytest.approx(0.0007 if engine else before), "h11")]
    assert sys.getswitchinterval() == before


def test_a_switch_interval_of_zero_is_one_line(tmp_path, capsys):
    from forgather.cli import inf

    assert inf.main(["server", "-m", str(tmp_path), "--switch-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--switch-interval 0.0" in err


def test_max_num_seqs_below_one_is_one_line(tmp_path, capsys):
    from forgather.cli import inf

    assert inf.main(["server", "-m", str(tmp_path), "--max-num-seqs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-num-seqs 0" in err


@pytest.mark.parametrize("flags, expected", [
    (["--port", "99999"], "--port 99999; give a port from 0 to 65535"),
    (["--max-model-len", "0"], "--max-model-len 0; give 1 or more tokens"),
    (["--device", "cuda:7"], "--device-map cuda:7: this machine has"),  # argparse takes --device for --device-map
    (["-d", "meta"], "--device-map meta: give auto, cpu, cuda or cuda:N"),
    (["-d", "cuda:one"], "--device-map cuda:one: give auto, cpu, cuda or cuda:N"),
])
def test_a_bad_port_length_or_device_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, flags, expected):
    from forgather.cli import inf
    from forgather.serve import server

    monkeypatch.setattr(server, "serve", lambda *args: pytest.fail("served"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert inf.main(["server", "-m", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_a_cuda_device_map_on_a_machine_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    from forgather.cli import inf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inf.main(["server", "-m", str(tmp_path), "--device-map", "cuda"]) == 2
    assert "--device-map cuda: this machine has no CUDA GPU" in capsys.readouterr().err


def test_a_model_the_engine_cannot_run_is_served_by_the_simple_loop(backend):
    spread = Backend(backend.model, backend.tokenizer, CONTEXT, set())
    backend.model.hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}  # as device_map="auto" leaves it
    try:
        with pytest.warns(UserWarning, match="spread over several devices"):
            spread.start_engine(2)
    finally:
        del backend.model.hf_device_map
    assert spread.engine is None


def test_the_decode_kernels_split_plan_covers_the_window_within_its_workspace():
    """decode_attention.split_plan: the splits' chunks cover every window (multiples of the kernel's key block,
    none empty), and no step needs more splits than the decoder's workspace holds, for any batch and window."""
    from forgather.serve.decode_attention import BLOCK_N, GROUP_PAD, split_plan, workspace

    for kv_heads, head_dim in ((1, 16), (8, 64), (32, 128)):
        for length in (127, 2048, 4096):
            slots = 8
            partial, counter = workspace(slots, kv_heads, head_dim, length + 1, "cpu")
            most = partial.numel() // (counter.numel() * GROUP_PAD * (head_dim + 2))
            assert counter.numel() == slots * kv_heads and not counter.any()
            windows = [w for w in (256, 512, 1024, 2048, 4096) if w < length + 1] + [length + 1]
            for batch in range(1, slots + 1):
                for keys in windows:
                    splits, chunk = split_plan(batch, kv_heads, keys)
                    assert chunk % BLOCK_N == 0 and (splits - 1) * chunk < keys <= splits * chunk
                    assert 1 <= splits <= most, (kv_heads, length, batch, keys)


def test_a_long_window_is_split_in_few_chunks_of_at_most_256_keys():
    """At batch 1 with 8 kv heads (the 1.24B shape): a split per 64 keys up to 8 splits, then chunks grow to 256
    keys, then splits grow again (the H200's fastest split of each window, docs/benchmarks.md); many rows
    leave less room to split."""
    from forgather.serve.decode_attention import split_plan

    plans = {keys: split_plan(1, 8, keys) for keys in (64, 256, 512, 1024, 2048, 4096, 8192)}
    assert plans == {64: (1, 64), 256: (4, 64), 512: (8, 64), 1024: (8, 128), 2048: (8, 256), 4096: (16, 256),
                     8192: (32, 256)}
    assert split_plan(32, 8, 4096) == (2, 2048)


def test_a_default_decode_kernel_that_fails_here_falls_back_to_the_matmul_attention(backend, monkeypatch):
    """Where the engine chose the Triton attention itself and the kernel fails (it does not compile on this
    GPU, say), the engine warns and decodes with the matmul path, giving the simple loop's tokens; asked for
    `fused_attention="triton"` explicitly, the failure is the caller's to see."""
    import forgather.serve.engine as engine_module
    import forgather.serve.fused as fused_module

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(engine_module, "_default_attention", lambda device: "triton")
    monkeypatch.setattr(fused_module, "decode_attention", broken)
    prompt, params = backend.encode(PROMPTS[0]), SamplingParams(max_tokens=6, temperature=0.0)
    with pytest.warns(UserWarning, match="decode kernels failed here .*PassManager.*fused_attention='matmul'"):
        engine = Engine(backend.model, set(), slots=2, context_length=CONTEXT)
    try:
        assert engine.fused is not None and (engine.fused.attention, engine.fused.matmul) == ("matmul", "torch")
        assert run_engine(engine, [prompt], [params])[0].tokens == simple_loop(backend, prompt, params)
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="PassManager"):
        Engine(backend.model, set(), slots=2, context_length=CONTEXT, fused_attention="triton")
