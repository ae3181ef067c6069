"""The inference backend on CUDA: `device_map="auto"` and `-c` (torch.compile) decode the same greedy tokens
as the plain single-device model, for a Forgather model directory and a Hugging Face Llama directory; under a
memory cap `device_map="auto"` offloads layers to the CPU, or spreads them over two GPUs where there are."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def tokenizer():
    from forgather.data.tokenizer import build_bpe_tokenizer

    return build_bpe_tokenizer(["once upon a time there was a tiny model"] * 4, vocab_size=300)


@pytest.fixture(scope="module", params=["forgather", "llama"])
def model_dir(request, tmp_path_factory, tokenizer):
    import transformers

    directory = tmp_path_factory.mktemp(request.param)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.2)
    model.save_pretrained(directory / "hf")
    tokenizer.save_pretrained(directory / "hf")
    if request.param == "llama":
        return directory / "hf"
    from forgather.convert.hf import hf_to_forgather

    return hf_to_forgather(directory / "hf", directory / "forgather")


def greedy_ids(backend, max_tokens: int = 24) -> list[int]:
    from forgather.serve.backend import SamplingParams

    return list(backend.tokens(backend.encode(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=0.0)))


def test_device_map_auto_decodes_like_one_device(model_dir):
    from forgather.serve.backend import Backend

    plain = Backend.load(model_dir, dtype="float32")
    assert next(plain.model.parameters()).device.type == "cuda"
    auto = Backend.load(model_dir, device_map="auto", dtype="float32")
    assert {p.device.type for p in auto.model.parameters()} == {"cuda"}
    assert greedy_ids(auto) == greedy_ids(plain)


def test_compiled_backend_decodes_like_the_eager_one(model_dir):
    from forgather.serve.backend import Backend

    eager = greedy_ids(Backend.load(model_dir, dtype="float32"))
    assert greedy_ids(Backend.load(model_dir, dtype="float32", compile=True)) == eager


def test_device_map_auto_with_cpu_offload_decodes_like_one_device(model_dir):
    from forgather.serve.backend import Backend

    spread = Backend.load(model_dir, device_map="auto", dtype="float32", max_memory={0: "5MiB", "cpu": "4GiB"})
    assert "cpu" in set(spread.model.hf_device_map.values())  # offloaded layers run on the GPU, weights streamed
    assert greedy_ids(spread) == greedy_ids(Backend.load(model_dir, dtype="float32"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_map_auto_spreads_layers_over_gpus(model_dir):
    from forgather.serve.backend import Backend

    parameters = sum(p.numel() * 4 for p in Backend.load(model_dir, dtype="float32").model.parameters())
    cap = {i: parameters // 2 + 2**20 for i in range(torch.cuda.device_count())}
    sharded = Backend.load(model_dir, device_map="auto", dtype="float32", max_memory=cap)
    assert len({p.device for p in sharded.model.parameters()}) >= 2
    assert greedy_ids(sharded) == greedy_ids(Backend.load(model_dir, dtype="float32"))


# --- the engine: CUDA graphs over the slot cache ------------------------------------------------------------


def engine_tokens(engine, prompts: list[list[int]], params: list) -> list[list[int]]:
    import threading

    results = [([], threading.Event()) for _ in prompts]
    for ids, p, (tokens, done) in zip(prompts, params, results):
        engine.submit(ids, p, lambda item, tokens=tokens, done=done: tokens.append(item) if isinstance(item, int)
                      else done.set())
    for _, done in results:
        assert done.wait(120)
    return [tokens for tokens, _ in results]


def test_graphed_engine_decodes_like_the_simple_loop_alone_and_batched(model_dir):
    from forgather.serve.backend import Backend, SamplingParams
    from forgather.serve.engine import Engine

    backend = Backend.load(model_dir, dtype="float32")
    prompts = [backend.encode(text) for text in (PROMPT, "there was", "a tiny model once upon")]
    # Lengths that differ: requests end while others decode, so steps queued ahead are dropped as well as used.
    greedy = [SamplingParams(max_tokens=24 - 7 * i, temperature=0.0) for i in range(len(prompts))]
    seeded = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=i) for i in range(len(prompts))]
    engine = Engine(backend.model, set(), slots=4, context_length=128)
    try:
        assert engine.graphs  # captured: the decode step replays CUDA graphs
        assert engine.fused is not None and engine.fused.attention == "triton"  # compiled, the decode kernel
        assert engine.lookahead  # the next greedy step queued before this one's tokens are read
        backend.stop_token_ids = set()
        simple = [list(backend.tokens(ids, p)) for ids, p in zip(prompts, greedy)]
        assert engine_tokens(engine, prompts[:1], greedy[:1]) == simple[:1]
        assert engine_tokens(engine, prompts, greedy) == simple
        alone = engine_tokens(engine, prompts[1:2], seeded[1:2])
        assert engine_tokens(engine, prompts, seeded)[1] == alone[0]
    finally:
        engine.close()


def test_a_model_placed_on_one_named_gpu_is_served_by_the_engine(model_dir):
    """`inf server -d cuda:0` (the reference Forgather's --device): the whole model on that GPU, and --engine
    auto serves it through the engine, with the simple loop's greedy tokens."""
    from forgather.cli.inf import _use_engine
    from forgather.serve.backend import Backend, SamplingParams

    assert _use_engine("auto", "cuda:0")
    plain = Backend.load(model_dir, dtype="float32")
    placed = Backend.load(model_dir, device_map="cuda:0", dtype="float32", engine=True, max_num_seqs=2)
    try:
        assert placed.engine is not None
        assert {p.device for p in placed.model.parameters()} == {torch.device("cuda:0")}
        greedy = SamplingParams(max_tokens=24, temperature=0.0)
        expected = list(plain.tokens(plain.encode(PROMPT), greedy))
        assert engine_tokens(placed.engine, [placed.encode(PROMPT)], [greedy]) == [expected]
    finally:
        placed.engine.close()


# --- the decode kernel (attention="triton") -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, keys, length", [
    (1, 32, 8, 64, 256, 4096),     # the 1.24B shape at batch 1: the window split over programs
    (1, 32, 32, 128, 512, 4096),   # the 7B shape (no grouping)
    (3, 8, 2, 64, 1024, 1100),     # a few rows, a long window
    (32, 32, 8, 64, 256, 4096),    # a full batch: one program a (row, kv head), no split
    (5, 12, 4, 128, 256, 300),
])
def test_the_decode_kernel_computes_the_reference(dtype, batch, heads, kv_heads, head_dim, keys, length):
    """decode_attention's kernel against its torch reference (the matmul path): the same cache writes and
    attention output, for rows anywhere in the window (its first position, its last, the scratch position past
    it), every split plan; run 20 times on one workspace (its counters must come back to zero each time)."""
    from forgather.serve.decode_attention import launch, reference, workspace

    torch.manual_seed(0)
    device = "cuda"
    cache = torch.randn(2, batch + 1, kv_heads, length + 1, head_dim, device=device).to(dtype)
    qkv = torch.randn(batch, heads + 2 * kv_heads, head_dim, device=device).to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    angles = torch.randn(batch, head_dim // 2, device=device)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    positions = torch.randint(0, keys, (batch,), device=device)
    positions[0] = 0
    if batch > 1:
        positions[1] = length  # the scratch position: sees the whole window, not itself
    if batch > 2:
        positions[2] = keys - 1
    expected_cache = cache.clone()
    expected = reference(q, k, v, cos, sin, positions, expected_cache, keys)
    partial, counter = workspace(batch + 1, kv_heads, head_dim, length + 1, device)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for _ in range(20):
        mine_cache = cache.clone()
        out = launch(q, k, v, cos, sin, positions, mine_cache, keys, partial, counter)
        torch.testing.assert_close(out.float(), expected.float(), **tolerance)
        torch.testing.assert_close(mine_cache.float(), expected_cache.float(), **tolerance)
        assert counter.sum().item() == 0


def test_the_decode_kernels_in_bf16_give_the_modules_logits(model_dir):
    """In bf16 (what serving runs) the decoder with the Triton kernels (attention and skinny products) gives the
    logits of the model's own modules to bf16's precision, as the matmul path and cuBLAS do; rows at different
    positions, batch 1 and 3. (Greedy sequences are not compared: in bf16 a near tie may go either way.)"""
    from forgather.serve.backend import Backend
    from forgather.serve.engine import Engine

    backend = Backend.load(model_dir, dtype="bfloat16")
    errors = {}
    for kernels in ("triton", "fused", "fused_all", "torch"):
        engine = Engine(backend.model, set(), slots=4, context_length=600,
                        fused_attention="matmul" if kernels == "torch" else "triton", fused_matmul=kernels)
        try:
            assert engine.fused is not None and engine.graphs
            for rows in (1, 3):
                ids = torch.arange(1, rows + 1, device="cuda")
                positions = torch.tensor([300, 17, 511][:rows], device="cuda")
                keys = engine.key_buckets[1]
                with torch.inference_mode():
                    engine._forward(ids[:, None] * 0 + 5, positions[:, None] - 1, slice(0, rows), keys)  # fill
                    theirs = engine._forward(ids[:, None], positions[:, None], slice(0, rows), keys).float()
                    mine = engine.fused(ids, positions, engine.key_ranges[keys])[0].float()
                errors[kernels, rows] = ((mine - theirs).norm() / theirs.norm()).item()
        finally:
            engine.close()
    for rows in (1, 3):
        for kernels in ("triton", "fused", "fused_all"):
            assert errors[kernels, rows] < max(0.05, 2 * errors["torch", rows]), errors


# Fixed tilings, one even and one not on the uneven shape (compiling the autotuner's ~20 for each shape and
# dtype would take minutes; the engine's tests and bench_serve's logit check run the autotuned ones).
# (Both fit the H200's 227 KiB of shared memory in float32 with the gated product's two weight tiles.)
SKINNY_CONFIGS = [dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=2),
                  dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=5),
                  dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=4)]  # split-K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs, inner", [(3072, 2048), (2048, 8192), (1000, 200)])
def test_the_skinny_product_is_f_linear(dtype, outputs, inner):
    """decode_attention.skinny_linear's Triton kernel gives F.linear's product for 1 to 16 rows, with and without
    a bias, on the 1.24B layer's shapes and an uneven one, each output tile whole or split-K."""
    from forgather.serve.decode_attention import launch_skinny

    torch.manual_seed(0)
    weight = (torch.randn(outputs, inner, device="cuda") * inner ** -0.5).to(dtype)
    bias = torch.randn(outputs, device="cuda").to(dtype)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, inner, device="cuda").to(dtype)
        for b in (None, bias):
            expected = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
            for config in SKINNY_CONFIGS:
                torch.testing.assert_close(launch_skinny(x, weight, b, config).double(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs, inner", [(3072, 2048), (2048, 8192), (1000, 200)])
def test_the_skinny_products_with_the_norm_or_the_swiglu_inside_are_their_torch_semantics(dtype, outputs, inner):
    """skinny_norm_linear's kernel, plain and gated (a SwiGLU's [gate | up] product and its activation), against
    its torch path (the op on a CPU)."""
    from forgather.models.norm import rms_norm
    from forgather.serve.decode_attention import launch_skinny

    torch.manual_seed(0)
    weight = (torch.randn(outputs, inner, device="cuda") * inner ** -0.5).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(inner, device="cuda")).to(dtype)
    tolerance = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for rows in (1, 3, 16):
        x, delta = (torch.randn(rows, inner, device="cuda").to(dtype) for _ in range(2))
        total = (x.float() + delta.float()).to(dtype)
        for config in SKINNY_CONFIGS:
            y, x_out = launch_skinny(x, weight, None, config, delta=delta, norm_weight=norm_weight, eps=1e-5)
            assert torch.equal(x_out, total)
            normed = rms_norm(total, norm_weight, 1e-5)
            torch.testing.assert_close(y.float(), torch.nn.functional.linear(normed, weight).float(), **tolerance)
            gate, up = torch.nn.functional.linear(normed, weight).chunk(2, dim=-1)
            y, x_out = launch_skinny(x, weight, None, config, delta=delta, norm_weight=norm_weight, eps=1e-5,
                                     gated=True)
            assert torch.equal(x_out, total)
            torch.testing.assert_close(y.float(), (torch.nn.functional.silu(gate) * up).float(), **tolerance)


def test_the_graph_tuner_chooses_tilings_that_compute_the_products(monkeypatch):
    """decode_attention.TUNER="graph" (tuning.py): each candidate timed in a CUDA graph over copies of the weight;
    the chosen tilings give F.linear's product and the norm + gate/up + SwiGLU's semantics, a split-K tiling is
    among the plain product's candidates only, and a second call times nothing."""
    from forgather.models.norm import rms_norm
    from forgather.serve import decode_attention as da
    from forgather.serve import tuning

    monkeypatch.setattr(da, "TUNER", "graph")
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    torch.manual_seed(0)
    down = (torch.randn(2048, 8192, device="cuda") * 8192 ** -0.5).to(torch.bfloat16)
    gate_up = (torch.randn(2 * 512, 2048, device="cuda") * 2048 ** -0.5).to(torch.bfloat16)
    x = torch.randn(1, 8192, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(da.launch_skinny(x, down, None).float(),
                               torch.nn.functional.linear(x, down).float(), rtol=2e-2, atol=2e-2)
    h, delta = (torch.randn(1, 2048, device="cuda").to(torch.bfloat16) for _ in range(2))
    norm_weight = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    y, total = da.launch_skinny(h, gate_up, None, delta=delta, norm_weight=norm_weight, eps=1e-5, gated=True)
    gate, up = torch.nn.functional.linear(rms_norm(total, norm_weight, 1e-5), gate_up).chunk(2, dim=-1)
    torch.testing.assert_close(y.float(), (torch.nn.functional.silu(gate) * up).float(), rtol=3e-2, atol=3e-2)
    choices = tuning.chosen()
    assert len(choices) == 2 and all(us > 0 for _, us in choices.values())
    norm_choice = [tiling for key, (tiling, _) in choices.items() if key[4]][0]
    assert "SPLIT_K" not in norm_choice
    monkeypatch.setattr(tuning, "graph_time_us", lambda *args: pytest.fail("timed again"))
    da.launch_skinny(x, down, None)


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_the_advance_kernel_is_its_torch_semantics_and_writes_pinned_host_memory_from_a_graph(batch, monkeypatch):
    """decode_attention.advance_inputs' Triton kernel (the engine's default on a GPU) gives the torch path's
    inputs and host tokens, called eagerly and replayed in a CUDA graph, where it stores into pinned host memory
    that the host reads after the replay."""
    from forgather.serve import decode_attention as da

    scratch = 4096
    positions = torch.arange(batch, device="cuda") * 7
    positions[::3] = scratch
    results = {}
    for how in ("torch", "triton"):
        monkeypatch.setattr(da, "ADVANCE", how)
        inputs = torch.stack((torch.zeros(batch, dtype=torch.long, device="cuda"), positions.clone()))
        host = torch.zeros(batch, dtype=torch.long, pin_memory=True)
        greedy = torch.randint(0, 1000, (batch,), device="cuda")
        da.advance_inputs(inputs, greedy, scratch, host)  # eager
        torch.cuda.synchronize()
        eager = (inputs.tolist(), host.tolist(), greedy.tolist())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            da.advance_inputs(inputs, greedy, scratch, host)
        greedy.copy_(torch.randint(0, 1000, (batch,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert host.tolist() == greedy.tolist()
        results[how] = (eager, inputs.tolist(), host.tolist())
        expected = [p if p == scratch else p + 2 for p in positions.tolist()]  # two steps: eager, then the replay
        assert inputs.tolist() == [greedy.tolist(), expected]
    assert results["torch"][0][0][1] == results["triton"][0][0][1]
    assert results["torch"][0][1] == results["torch"][0][2] and results["triton"][0][1] == results["triton"][0][2]


@pytest.mark.parametrize("batch, vocab", [(1, 128256), (5, 5000), (32, 1024)])
def test_the_greedy_advance_kernel_is_argmax_and_the_advance(batch, vocab, monkeypatch):
    """decode_attention.greedy_advance's kernel (the engine's step's last launch): argmax's first index of tied
    maxima, across chunks and within one; the next inputs and the host's tokens as advance_inputs writes them;
    the same in a CUDA graph, replayed twice (the counters reset by each row's last program)."""
    from forgather.serve import decode_attention as da
    from forgather.serve.fused import ARGMAX_CHUNK

    monkeypatch.setattr(da, "ADVANCE", "triton")
    scratch = 4096
    logits = torch.randn(batch, vocab, device="cuda").to(torch.bfloat16)
    top = logits.max() + 1
    logits[0, min(vocab - 1, ARGMAX_CHUNK + 3)] = top  # a tie across chunks: the later chunk's first
    logits[0, vocab - 1] = top
    if batch > 1:
        logits[1, 7] = logits[1, 9] = top  # a tie within a chunk
    positions = torch.arange(batch, device="cuda") * 3
    positions[::4] = scratch
    inputs = torch.stack((torch.zeros(batch, dtype=torch.long, device="cuda"), positions.clone()))
    host = torch.zeros(batch, dtype=torch.long, pin_memory=True)
    greedy = da.greedy_advance(logits, inputs, scratch, host)
    torch.cuda.synchronize()
    assert greedy.tolist() == logits.argmax(-1).tolist() == host.tolist() == inputs[0].tolist()
    assert inputs[1].tolist() == [p if p == scratch else p + 1 for p in positions.tolist()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = da.greedy_advance(logits, inputs, scratch, host)
    for replay in (2, 3):
        logits.copy_(torch.randn(batch, vocab, device="cuda").to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert captured.tolist() == logits.argmax(-1).tolist() == host.tolist()
        assert inputs[1].tolist() == [p if p == scratch else p + replay for p in positions.tolist()]


def test_kernels_launched_early_wait_for_their_inputs():
    """Under programmatic dependent launch (decode_attention.PDL, on by default on a Hopper GPU) each kernel
    starts while the one before still runs: a chain of dependent decode kernels (norm + q/k/v product,
    attention, output product, norm + gate/up + SwiGLU, down product, 8 layers, replayed in a CUDA graph) gives
    bitwise what it gives launched one after another."""
    from forgather.serve import decode_attention as da
    from forgather.triton_support import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    torch.manual_seed(0)
    hidden, heads, kv_heads, head_dim, inner, keys = 512, 8, 2, 64, 1024, 256
    dtype, device = torch.bfloat16, "cuda"
    layers = [dict(qkv=torch.randn((heads + 2 * kv_heads) * head_dim, hidden, device=device, dtype=dtype) / 23,
                   o=torch.randn(hidden, heads * head_dim, device=device, dtype=dtype) / 23,
                   gate_up=torch.randn(2 * inner, hidden, device=device, dtype=dtype) / 23,
                   down=torch.randn(hidden, inner, device=device, dtype=dtype) / 32,
                   cache=torch.randn(2, 1, kv_heads, 4097, head_dim, device=device, dtype=dtype))
              for _ in range(8)]
    norm = torch.ones(hidden, device=device, dtype=dtype)
    angles = torch.randn(1, head_dim // 2, device=device)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    positions = torch.tensor([200], device=device)
    partial, counter = da.workspace(1, kv_heads, head_dim, 4097, device)
    config = dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3)
    split = dict(config, SPLIT_K=4)  # the output and down products split-K: their tile counters in the chain

    def step(x0):
        x, delta = x0, torch.zeros_like(x0)
        for w in layers:
            qkv, x = da.launch_skinny(x, w["qkv"], None, config, delta=delta, norm_weight=norm, eps=1e-5)
            q, k, v = qkv.view(1, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], dim=1)
            attended = da.launch(q, k, v, cos, sin, positions, w["cache"], keys, partial, counter)
            o = da.launch_skinny(attended.reshape(1, -1), w["o"], None, split)
            activated, x = da.launch_skinny(x, w["gate_up"], None, config, delta=o, norm_weight=norm, eps=1e-5,
                                            gated=True)
            delta = da.launch_skinny(activated, w["down"], None, split)
        return (x.float() + delta.float()).to(dtype)

    x0 = torch.randn(1, hidden, device=device, dtype=dtype)
    results = {}
    saved = da.PDL
    try:
        for pdl in (False, True):
            da.PDL = pdl
            step(x0)  # compiles this variant's kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(x0)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            results[pdl] = out.clone()
    finally:
        da.PDL = saved
    assert torch.isfinite(results[False]).all()
    assert torch.equal(results[True], results[False])
    assert all(int(counters.sum()) == 0 for counters in da._TILE_COUNTERS.values())  # reset by each tile's last
