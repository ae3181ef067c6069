"""Serving speed on one GPU, one run, side by side: Hugging Face `generate`, our engine, and the HTTP server.

Random weights in bf16, Llama shapes: `1b` is bench_train's 1.24B Llama-3.2-1B shape (hidden 2048, 16 layers,
32 / 8 KV heads, SwiGLU 8192, vocab 128256, tied), `7b` is bench_memory's (hidden 4096, 32 layers, 32
heads, 11008, vocab 32000). A `--prompt`-token prompt (default 128) and `--tokens` greedy tokens (256):
  hf eager         transformers generate(), dynamic cache, batch 1
  hf static        generate(cache_implementation="static"), which transformers compiles (--hf-compile)
  engine           forgather.serve.engine.Engine at batch 1 as the server runs it (the fused decoder, compiled,
                   in CUDA graphs), the HF model and the same model converted to a Forgather directory; the
                   7B shape too; `--variants [NAME ...]` (default all) adds the fused decoder's other
                   attentions (the default is `triton`, one kernel launch for rotary, cache write and attention;
                   `matmul`: two products and a softmax; `sdpa`: torch's fused kernel; `reduce`: sums that
                   inductor fuses with the softmax), the layer's products through our Triton kernel for a few
                   rows instead of cuBLAS (`skinny`), that kernel with the norms and the SwiGLU inside
                   (`fused`; `fused_down`, the default where PDL runs: the down product ours too, split-K
                   where it times faster; `cublas`: cuBLAS's products; `fused_all`: the output product ours
                   too), the tilings chosen by Triton's autotuner instead of timed in a CUDA graph
                   (`autotuner`, `fused_autotuner`: the default before 2026-12-04), programmatic dependent
                   launch off (`nopdl`, `fused_nopdl`), the step's end (the next step's inputs, the tokens to
                   the host) as torch ops instead of one kernel (`advance_torch`), the prompts' forward passes
                   compiled with bursts (`prefill_compiled`), requests that sample, alone and in bursts
                   (`sampled`), the engine without lookahead (`serial`), and the
                   models' own `modules` (the engine before the fused decoder), all in CUDA graphs
  ttft 2048        the engine's time to first token for a 2048-token prompt, nothing else running
  burst N          N completions submitted to the engine at once (no HTTP; each --concurrency above 1, twice):
                   TTFT median and longest, p50/p99 gaps, the gaps over 3x the median (steps that prefilled)
  http N           `forgather inf server` (a subprocess, the engine, 32 slots) driven by the official
                   `openai` client, N concurrent streams of one completion each (token-id prompts), spread
                   over client processes of `--streams-per-client` streams (one client process cannot parse
                   32 streams' chunks as fast as a GPU makes them); with several `--servers`, the rows again
                   for each further server (`http N streams, server OPTIONS`)
Rows: tokens/s (batch 1: decode tokens/s after the first token; http: all streams' tokens over the wall
time), time to first token, p50/p99 inter-token latency, and batch 1's share of the HBM floor (weights
read once per token at --bandwidth bytes/s). The tokenizer is a word-level one with a word per id, so
every token is a chunk of text. Prints a markdown table; `--json FILE` also writes the rows.

    python scripts/bench_serve.py [--shape 1b] [--skip-7b] [--skip-http] [--skip-forgather] [--hf-compile] [--json rows.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# torch is imported in the functions that use it: the HTTP rows' client processes (spawned) import this module
# again, and need only the client
from forgather.ports import free_port
from forgather.serve.client import wait_for_server

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
    "7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True),
}
ROWS: list[dict] = []


def row(name: str, **values) -> None:
    ROWS.append({"name": name, **values})
    print(json.dumps(ROWS[-1]), flush=True)


def random_llama(shape: str, device: str):
    import torch
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, eos_token_id=None,
                                      bos_token_id=None, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # transformers' own random init (normal, std 0.02), run on the GPU
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    return model.eval()


def word_tokenizer(vocab: int):
    """One word per id ("w17"), no special tokens: every token decodes to text, none ends a completion."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, clean_up_tokenization_spaces=False,
                                   model_max_length=8192)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- Hugging Face generate --------------------------------------------------------------------------------


def bench_hf(model, prompt: torch.Tensor, tokens: int, static: bool) -> None:
    options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if static:
        options["cache_implementation"] = "static"
    for attempt in range(2 if static else 1):  # static: the first call compiles
        sync()
        start = time.perf_counter()
        out = model.generate(prompt, **options)
        sync()
        elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + tokens
    row("hf static+compile" if static else "hf eager", tokens_per_s=tokens / elapsed)


# --- the engine ---------------------------------------------------------------------------------------------


class Timed:
    def __init__(self):
        self.times, self.finish, self.done = [], None, threading.Event()

    def __call__(self, item):
        if isinstance(item, int):
            self.times.append(time.perf_counter())
        else:
            self.finish = item
            self.done.set()


class CollectorPauses:
    """Seconds the garbage collector ran while it is entered (gc.callbacks), and the longest collection: a
    full collection of a process holding a model and its compiled graphs can stall a decode loop."""

    def __enter__(self):
        self.total = self.longest = 0.0
        self._start = None
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            pause = time.perf_counter() - self._start
            self.total, self.longest = self.total + pause, max(self.longest, pause)


# How the engine rows' requests sample (the `sampled` variant: temperature and top-p, a seed per request).
GREEDY = dict(temperature=0.0)


def engine_run(engine, prompt: list[int], tokens: int, sampling: dict = GREEDY) -> tuple[float, float, list[float]]:
    """(seconds to the first token, decode tokens/s after it, inter-token gaps) of one request alone."""
    from forgather.serve.backend import SamplingParams

    timed = Timed()
    start = time.perf_counter()
    engine.submit(prompt, SamplingParams(max_tokens=tokens, **sampling), timed)
    timed.done.wait()
    assert len(timed.times) == tokens, (len(timed.times), timed.finish)
    gaps = [b - a for a, b in zip(timed.times, timed.times[1:])]
    return timed.times[0] - start, (tokens - 1) / (timed.times[-1] - timed.times[0]) if gaps else 0.0, gaps


def engine_burst(engine, prompt: list[int], tokens: int, requests: int, sampling: dict = GREEDY) -> dict:
    """`requests` completions submitted at once straight to the engine (no HTTP): the median and longest time
    to first token, all tokens over the wall time, the p50/p99 gaps of every stream, and the gaps over 3x the
    median (the steps that also prefilled). Beside the `http N` rows it tells the engine's share of theirs."""
    from forgather.serve.backend import SamplingParams

    timers = [Timed() for _ in range(requests)]
    start = time.perf_counter()
    for index, timed in enumerate(timers):
        seeded = dict(sampling, seed=index) if sampling.get("temperature") else sampling
        engine.submit(prompt, SamplingParams(max_tokens=tokens, **seeded), timed)
    for timed in timers:
        timed.done.wait()
    assert all(len(timed.times) == tokens for timed in timers), [t.finish for t in timers]
    ttfts = sorted(timed.times[0] - start for timed in timers)
    gaps = [b - a for timed in timers for a, b in zip(timed.times, timed.times[1:])]
    median = percentile(gaps, 0.5)
    return dict(tokens_per_s=requests * tokens / (max(t.times[-1] for t in timers) - start),
                ttft_ms=statistics.median(ttfts) * 1e3, ttft_max_ms=ttfts[-1] * 1e3, itl_p50_ms=median * 1e3,
                itl_p99_ms=percentile(gaps, 0.99) * 1e3, itl_max_ms=max(gaps) * 1e3,
                long_gaps=sum(gap > 3 * median for gap in gaps))


def bench_engine(name: str, model, prompt: list[int], tokens: int, floor: float, ttft_prompt: int | None,
                 slots: int = 32, profile: bool = False, settings: dict | None = None, bursts: tuple[int, ...] = (),
                 sampling: dict = GREEDY, **options) -> None:
    """One engine row (Engine(**options)), with `ttft_prompt`'s TTFT and `bursts`' rows; `settings` overrides
    forgather.serve.decode_attention's module settings (PDL) for this row only."""
    from forgather.serve import decode_attention

    saved = {key: getattr(decode_attention, key) for key in settings or {}}
    try:
        for key, value in (settings or {}).items():
            setattr(decode_attention, key, value)
        _bench_engine(name, model, prompt, tokens, floor, ttft_prompt, slots, profile, bursts, options, sampling)
    finally:
        for key, value in saved.items():
            setattr(decode_attention, key, value)


def _bench_engine(name: str, model, prompt: list[int], tokens: int, floor: float, ttft_prompt: int | None,
                  slots: int, profile: bool, bursts: tuple[int, ...], options: dict, sampling: dict = GREEDY) -> None:
    import torch

    from forgather.serve.engine import Engine

    started = time.perf_counter()
    try:
        engine = Engine(model, set(), slots=slots, context_length=max(4096, len(prompt) + tokens), **options)
    except Exception as error:  # a variant that does not compile here is a row with its error; the others go on
        row(name, error=f"{type(error).__name__}: {str(error)[:300]}")
        return
    setup = time.perf_counter() - started
    gc.collect()  # as `forgather inf server` does before serving (server.py); unfrozen when the row is done,
    gc.freeze()   # so that the next row's collection frees this engine
    try:
        from forgather.serve.decode_attention import dependent_launch

        extra = dict(fused=engine.fused is not None, setup_s=setup, pdl=dependent_launch(engine.device),
                     attention=engine.fused.attention if engine.fused is not None else None,
                     matmul=engine.fused.matmul if engine.fused is not None else None)
        if engine.fused is not None:  # the step as run (compiled) against the modules' step: two rows' logits
            ids = torch.tensor([1, 2], device=engine.device)
            positions = torch.full((2,), 300, device=engine.device)
            keys = engine.key_buckets[1]
            with torch.inference_mode():
                theirs = engine._forward(ids[:, None], positions[:, None], slice(0, 2), keys).float()
                mine = engine.fused(ids, positions, engine.key_ranges[keys])[0].float()
            extra["logit_error"] = ((mine - theirs).norm() / theirs.norm()).item()
            extra["same_argmax"] = bool((mine.argmax(-1) == theirs.argmax(-1)).all())
        extra["tuned"] = tuned_configs()
        engine_run(engine, prompt, tokens, sampling)  # warm-up
        with CollectorPauses() as pauses:
            ttft, rate, gaps = engine_run(engine, prompt, tokens, sampling)
        row(name, tokens_per_s=rate, ttft_ms=ttft * 1e3, itl_p50_ms=percentile(gaps, 0.5) * 1e3,
            itl_p99_ms=percentile(gaps, 0.99) * 1e3, itl_max_ms=max(gaps, default=0.0) * 1e3,
            gc_ms=pauses.total * 1e3, gc_longest_ms=pauses.longest * 1e3, floor_share=rate / floor, **extra)
        if profile and engine.graphs:
            profile_step(engine)
        if ttft_prompt:
            long = [(7 * i) % len(model.get_input_embeddings().weight) for i in range(ttft_prompt)]
            engine_run(engine, long, 2)
            samples = [engine_run(engine, long, 2)[0] for _ in range(5)]
            row(f"{name} ttft {ttft_prompt}", ttft_ms=statistics.median(samples) * 1e3)
        for requests in (n for n in bursts if n <= engine.slots):  # twice: the second shows any first-time cost
            row(f"{name} burst {requests}", **engine_burst(engine, prompt, tokens, requests, sampling))
            row(f"{name} burst {requests} again", **engine_burst(engine, prompt, tokens, requests, sampling))
    finally:
        engine.close()
        gc.unfreeze()


def tuned_configs() -> dict:
    """The autotuner's pick for each of our product kernels' keys so far in this process (shape, options ->
    tiling), to set beside a row's speed: the picks, split-K ones above all, differ between processes."""
    from forgather.serve import tuning

    picks = {str(key): f"{tiling} ({us:.2f} us)" for key, (tiling, us) in tuning.chosen().items()}
    try:
        from forgather.serve import decode_kernels
    except ImportError:  # no triton here
        return picks
    return picks | {str(key): str(config) for tuner in (decode_kernels.skinny_matmul, decode_kernels.skinny_matmul_split)
                    for key, config in tuner.tuned.cache.items()}


def _graph(engine, size: int):
    """A captured decode step of `size` rows at the shortest window (the graphs' keys start with batch and
    window; an engine before 2026-12-04 had one graph per pair, later ones have one per turn too)."""
    return next(graph for key, (graph, *_) in engine.graphs.items() if key[:2] == (size, engine.key_buckets[0]))


def profile_step(engine) -> None:
    """GPU time of one graphed decode step at batch 1 and 32 (graph replays back to back), and the kernels of
    five replays at batch 1 by CUDA time."""
    import torch

    for size in (1, engine.slots):
        graph = _graph(engine, size)
        sync()
        start = time.perf_counter()
        for _ in range(100):
            graph.replay()
        sync()
        row(f"graph step batch {size}", step_ms=(time.perf_counter() - start) * 10)
    graph = _graph(engine, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60), flush=True)


# --- the HTTP server ----------------------------------------------------------------------------------------


async def stream_one(client, prompt: list[int], tokens: int) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    times, count = [], 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:  # a word per token: the chunk's token count
            times.append((time.perf_counter(), len(chunk.choices[0].text.split())))
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return start, times, count


async def client_streams(url: str, streams: int, prompt: list[int], tokens: int, barrier=None) -> list:
    """`streams` concurrent completions from one AsyncOpenAI client, after a warm-up (and, with `barrier`,
    once every client process is ready): (start, [(time, tokens in the chunk)], completion tokens) each."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                http_client=httpx.AsyncClient(limits=limits, timeout=600))
    await stream_one(client, prompt, 8)  # warm-up
    if barrier is not None:
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
    results = await asyncio.gather(*(stream_one(client, prompt, tokens) for _ in range(streams)))
    await client.close()
    return results


def _client_process(url: str, streams: int, prompt: list[int], tokens: int, barrier, results) -> None:
    results.put(asyncio.run(client_streams(url, streams, prompt, tokens, barrier)))


def drive(url: str, streams: int, prompt: list[int], tokens: int, per_process: int) -> dict:
    """`streams` concurrent streams from client processes of at most `per_process` streams each: one Python
    client parsing a chunk per token of 32 streams saturates its core (the openai client measured against a
    server sending perfectly timed chunks, 32 streams at 1.8 ms a step: p50 gap 0.08 ms, p99 97 ms), and then
    measures itself, not the server."""
    import multiprocessing

    counts = [per_process] * (streams // per_process) + ([streams % per_process] if streams % per_process else [])
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(len(counts) + 1), context.Queue()
    workers = [context.Process(target=_client_process, args=(url, n, prompt, tokens, barrier, queue))
               for n in counts]
    for worker in workers:
        worker.start()
    barrier.wait()
    begin = time.perf_counter()
    results = [stream for _ in workers for stream in queue.get()]
    wall = time.perf_counter() - begin  # perf_counter is the machine's monotonic clock: shared by processes
    for worker in workers:
        worker.join()
    total = sum(count for *_, count in results)
    ttfts = [times[0][0] - start for start, times, _ in results if times]
    # A chunk may carry several tokens (the server coalesces what a slow reader left): its gap is spread
    # evenly over its tokens.
    gaps = [(b - a) / n for _, times, _ in results for (a, _), (b, n) in zip(times, times[1:]) for _ in range(n)]
    chunks = sum(len(times) for _, times, _ in results)
    return dict(tokens_per_s=total / wall, ttft_ms=statistics.median(ttfts) * 1e3,
                itl_p50_ms=percentile(gaps, 0.5) * 1e3, itl_p99_ms=percentile(gaps, 0.99) * 1e3,
                tokens_per_chunk=total / max(1, chunks), client_processes=len(workers))


def server_options(spec: str) -> list[str]:
    """`forgather inf server` options from a --servers entry: "default" is none, "http=h11,switch-interval=0.005"
    is --http h11 --switch-interval 0.005."""
    if spec == "default":
        return []
    return [part for option in spec.split(",") for part in (f"--{option.split('=', 1)[0]}", option.split("=", 1)[1])]


def bench_http(directory: Path, prompt: list[int], tokens: int, concurrency: list[int], per_process: int,
               servers: list[str]) -> None:
    for index, spec in enumerate(servers):
        _bench_http(directory, prompt, tokens, concurrency, per_process, server_options(spec),
                    f", server {spec}" if index else "")


def _bench_http(directory: Path, prompt: list[int], tokens: int, concurrency: list[int], per_process: int,
                options: list[str], suffix: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "forgather.cli.inf", "server", "-m", str(directory), "--port", str(port),
               "--max-num-seqs", str(max(concurrency)), "--max-model-len", str(len(prompt) + tokens + 8),
               "--served-model-name", "bench", "--log-level", "warning", "--engine", "on", *options]
    log = directory.parent / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, lambda: server.poll() is None, lambda: log.read_text()[-2000:], timeout=300)
        for streams in concurrency:
            row(f"http {streams} streams{suffix}", **drive(url, streams, prompt, tokens, per_process))
    finally:
        server.terminate()
        server.wait(timeout=60)


# --variants: name -> (the row's name after "engine hf-llama, ", Engine options), run in this order.
VARIANTS = {
    "default": ("default", dict()),  # the first row's engine again, to set beside the others of a round
    "matmul": ("matmul attention", dict(fused_attention="matmul")),
    "sdpa": ("sdpa attention", dict(fused_attention="sdpa")),
    "reduce": ("reduce attention", dict(fused_attention="reduce")),
    "cublas": ("cuBLAS products", dict(fused_matmul="torch")),
    "fused": ("norm and SwiGLU in the products", dict(fused_matmul="fused")),
    "skinny": ("Triton products", dict(fused_matmul="triton")),
    "fused_all": ("all four products ours (split-K), norm and SwiGLU inside", dict(fused_matmul="fused_all")),
    # Our kernels under PDL let the next one launch after their loads (decode_attention.PDL_TRIGGER="end"), not
    # right after their own wait: the next kernel's programs do not wait on the SMs beside this one's later waves.
    "pdl_end": ("PDL trigger at the end", dict(settings=dict(PDL_TRIGGER="end"))),
    "fused_down_end": ("down product ours (split-K), PDL trigger at the end",
                       dict(fused_matmul="fused_down", settings=dict(PDL_TRIGGER="end"))),
    # The default below a hidden size of 4096 where PDL runs (every kernel of ours then releases after its loads).
    "fused_down": ("down product ours (split-K)", dict(fused_matmul="fused_down")),
    # The decode-attention kernel's least keys a program (decode_attention.MIN_CHUNK, 64): 32 splits a window
    # of 256 over twice the programs, 256 or more gives each (row, kv head) one program and no combining step.
    "chunk32": ("attention split 32 keys", dict(settings=dict(MIN_CHUNK=32))),
    "chunk128": ("attention split 128 keys", dict(settings=dict(MIN_CHUNK=128))),
    "chunk256": ("attention split 256 keys", dict(settings=dict(MIN_CHUNK=256))),
    "chunk_whole": ("attention unsplit", dict(settings=dict(MIN_CHUNK=1 << 20))),
    # The products' tilings chosen by Triton's autotuner (each candidate timed call by call), not timed as the
    # step runs them (decode_attention.TUNER="graph", tuning.py, the default): with the default products and
    # with the default before 2026-12-04 ("fused" under the autotuner).
    "autotuner": ("tilings by Triton's autotuner", dict(settings=dict(TUNER="triton"))),
    "fused_autotuner": ("norm and SwiGLU in the products, tilings by Triton's autotuner",
                        dict(fused_matmul="fused", settings=dict(TUNER="triton"))),
    # Before decode_attention.SPLIT_CAP: a split per 64 keys of a long window, up to 33 at batch 1.
    "uncapped": ("attention split per 64 keys, uncapped", dict(settings=dict(SPLIT_CAP=1 << 20))),
    # Programmatic dependent launch of our kernels off (decode_attention.PDL; on by default where the GPU has
    # it, and then the default products are "fused"): the engine's default products then are cuBLAS's.
    "nopdl": ("no PDL", dict(settings=dict(PDL=False))),
    "fused_nopdl": ("norm and SwiGLU in the products, no PDL", dict(fused_matmul="fused", settings=dict(PDL=False))),
    # The step's end (decode_attention.advance_inputs: the next step's inputs and the tokens to the host) as torch
    # ops and a copy to the host, where the default is one Triton kernel that writes the host's pinned memory.
    "advance_torch": ("next inputs by torch ops", dict(settings=dict(ADVANCE="torch"))),
    # The prompts' forward passes compiled (eager by default): its TTFT, and bursts of 8 and 32 requests at once,
    # whose long gaps are the decode steps that also prefilled.
    "prefill_compiled": ("compiled prefill", dict(compile_prefill=True, bursts=(8, 32))),
    # Requests that sample (temperature 0.7, top-p 0.9, a seed each) at batch 1 and in bursts of 8 and 32: no step
    # is queued ahead, and the engine samples a step's rows together (causal_lm.sample_rows).
    "sampled": ("sampled (temperature 0.7, top-p 0.9)", dict(sampling=dict(temperature=0.7, top_p=0.9, seed=0),
                                                           bursts=(8, 32))),
    "serial": ("no lookahead", dict(lookahead=False)),
    "modules": ("the model's modules", dict(compile=False, fused=False)),
}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=("1b", "tiny"))
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--servers", nargs="+", default=["default"], metavar="OPTIONS",
                        help="the http rows' servers, each 'default' or options as 'http=h11,switch-interval=0.005' "
                             "(forgather inf server's): the rows again for each further one")
    parser.add_argument("--streams-per-client", type=int, default=4,
                        help="streams one client process drives (the load spreads over processes)")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s (H200: 4.8e12)")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--variants-7b", nargs="*", choices=VARIANTS, default=[],
                        help="these variants on the 7B shape too (its default row is always run)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times in turn (rows suffixed '(round N)')")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-forgather", action="store_true", help="no converted Forgather directory's row")
    parser.add_argument("--hf-compile", action="store_true", help="also generate() with a static cache (compiles)")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=[],
                        help="also these (all of them if none is named): the fused decoder's other attentions and "
                             "products, the engine without lookahead, the model's own modules")
    parser.add_argument("--profile", action="store_true", help="time graph replays; list the step's kernels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.variants == [] and "--variants" in sys.argv:
        args.variants = list(VARIANTS)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of the script (--shape tiny)
    prompt = [(13 * i) % SHAPES[args.shape]["vocab_size"] for i in range(args.prompt)]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, shape {args.shape}, prompt {args.prompt}, "
          f"{args.tokens} tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_llama(args.shape, device)
        floor = args.bandwidth / weight_bytes(model)
        row("hbm floor", tokens_per_s=floor, weights_gib=weight_bytes(model) / 2**30)
        if not args.skip_hf:
            bench_hf(model, torch.tensor([prompt], device=device), args.tokens, static=False)
        # Saved first: the engine rebinds the model's q/k/v and gate/up weights as views of fused tensors.
        hf_dir, forgather_dir = Path(tmp) / "hf", Path(tmp) / "forgather"
        model.save_pretrained(hf_dir)
        word_tokenizer(SHAPES[args.shape]["vocab_size"]).save_pretrained(hf_dir)
        bench_engine("engine hf-llama", model, prompt, args.tokens, floor, 2048, profile=args.profile,
                     bursts=tuple(n for n in args.concurrency if n > 1))
        from forgather.convert.hf import hf_to_forgather
        from forgather.serve.backend import Backend

        if not args.skip_forgather:
            hf_to_forgather(hf_dir, forgather_dir)
            forgather = Backend.load(forgather_dir, dtype="bfloat16").model
            bench_engine("engine forgather", forgather, prompt, args.tokens, floor, 2048, profile=args.profile)
        if not args.skip_http:
            bench_http(hf_dir, prompt, args.tokens, args.concurrency, args.streams_per_client, args.servers)
        big = None
        if not args.skip_7b and args.shape == "1b":
            big = random_llama("7b", device)
            row("hbm floor 7b", tokens_per_s=args.bandwidth / weight_bytes(big))
            bench_engine("engine hf-llama 7b", big, prompt, args.tokens, args.bandwidth / weight_bytes(big), None,
                         slots=4, profile=args.profile)
            if "modules" in args.variants:
                bench_engine("engine hf-llama 7b, the model's modules", big, prompt, args.tokens,
                             args.bandwidth / weight_bytes(big), None, slots=4, compile=False, fused=False)
        # Then the variants, each beside the first row (those that compile take a minute each), `--rounds` times
        # in turn: the same variant's rows of one call differ by a few percent from engine to engine.
        for round_ in range(args.rounds):
            suffix = f" (round {round_ + 1})" if args.rounds > 1 else ""
            for variant, (label, options) in VARIANTS.items():
                if variant in args.variants:
                    bench_engine(f"engine hf-llama, {label}{suffix}", model, prompt, args.tokens, floor, None,
                                 profile=args.profile and variant not in ("serial", "modules"), **options)
            for variant, (label, options) in VARIANTS.items() if big is not None else ():
                if variant in args.variants_7b and variant != "modules":
                    bench_engine(f"engine hf-llama 7b, {label}{suffix}", big, prompt, args.tokens,
                                 args.bandwidth / weight_bytes(big), None, slots=4, **options)
        del big
        # Last, the runs that compile (minutes, and their failures vary by version): the rows above are out.
        if args.hf_compile:
            try:
                bench_hf(model, torch.tensor([prompt], device=device), args.tokens, static=True)
            except Exception as error:  # transformers' compile path varies by version: report, go on
                row("hf static+compile", error=f"{type(error).__name__}: {str(error)[:200]}")
    print("\n| run | tokens/s | TTFT ms | ITL p50 ms | ITL p99 ms | share of HBM floor |\n| --- | --- | --- | --- | --- | --- |")
    for r in ROWS:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in
                 ("tokens_per_s", "ttft_ms", "itl_p50_ms", "itl_p99_ms", "floor_share")]
        print(f"| {r['name']} | " + " | ".join(cells) + (f" {r['error']}" if "error" in r else "") + " |")
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
