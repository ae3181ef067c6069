"""The serving engine: continuous batching over a preallocated KV cache, one thread, one step at a time.

`Engine(model, stop_token_ids, slots, context_length)` owns a `SlotKVCache` (forgather/models/kv_cache.py)
of `slots` sequences of `context_length` tokens and a `Scheduler` (scheduler.py). `submit(prompt_ids,
params, deliver)` queues a request and returns it (`QueueFull` past the queue's bound; `cancel(request)`
frees its slot before the next step). The engine's thread loops: admit waiting requests into free slots,
prefill prompt chunks (several prompts in one forward pass), decode one token for every running request,
sample each row with its own parameters and its own torch.Generator, and hand each request its token
(`deliver`, on this thread). A part of a step that fails for several requests runs again for each alone, so
that only the faulty ones end (with the error); `close()`, or an error escaping a step, ends every request
left with `EngineStopped`, and later submits raise it.

Both model kinds the server loads run the same step over the same cache, each by calling its own modules:
- a Forgather directory: `model.model` is the plain model (embed, rope, layers, norm, lm_head_weight); its
  layers take `(x, rope, mask, layer_cache)`, given a `SlotMask` and the cache's `SlotRows`;
- a Hugging Face Llama-family directory (Llama, Mistral, Qwen3: `model.model.embed_tokens`, `layers`,
  `norm`, `rotary_emb`): the decoder layers are called with per-row `position_ids`, a 4-D additive mask and
  the `SlotRows` as their cache, whose `update(k, v, layer_idx)` is what transformers' attention calls.
  transformers' StaticCache is not used: it writes one `cache_position` for every row, and continuous
  batching needs each row at its own position.
The attention mask shows row b's query at position p the keys 0..p of its own slot; nothing else differs
between a row decoded alone and in a batch, so greedy tokens (and seeded samples) do not depend on who else
is running, up to the floating-point differences a GPU's batched kernels may bring.

A decode step attends over a window of the cache, the shortest bucket (256, 512, ... positions) that
holds every running sequence, so short sequences do not pay for the whole context. On a GPU the decode
step is captured as CUDA graphs, two per batch bucket (1, 2, 4, ... slots, a prefix of the slots) and
window, one for each of the two host buffers its tokens go to: one graph launch per token instead of
hundreds of kernel launches. A step reads its token ids and positions from one device tensor per batch
bucket (`step_inputs`) and ends by writing the next step's there, its greedy ids at the next positions, and
its greedy ids to pinned host memory (decode_attention.greedy_advance: on a GPU one kernel, which stores
into the host's memory directly). The host copies inputs in only where they are not that (a request joins
or ends, a row samples). Sampling runs on the device: argmax for greedy rows, and for the others
`sample_rows`, the shared `sample_next_token`'s arithmetic for every sampled row at once, each row drawn by its
own generator. The one host sync per step reads the sampled ids. Prefill runs eagerly (prompt lengths vary).

Lookahead (default: where the decode step is graphed): while the host waits for a step's tokens, the next
step is already queued behind it, a replay of its graph and nothing else, since the step before wrote its
inputs. The host's own work between two steps (reading the tokens, handing them out, planning) then overlaps
the GPU's instead of adding to it: on the H200 that was 0.07 to 0.6 ms a token; and with the inputs written
by the step itself, no copy or launch sits between two steps' graphs (the copies in and out and the two
launches that fed a queued step had cost ~20 us a token: docs/benchmarks.md). Between a step's launch and the
host's read of its tokens at most one more step is launched, and it writes the other host buffer. It runs
only where the next step is known: every row greedy and none at its last token. A queued step is used when the next plan
decodes the same requests at the positions it assumed; otherwise (a stop token, a cancellation, a new
request joining) it is dropped and the step runs again from the host's inputs. A dropped step only wrote
keys and values at positions past its rows' ends, which a later occupant of the slot overwrites before it
reads them, and its tokens are never handed out, so what a request receives is the same with or without it.

Decoding goes through `FusedDecoder` (fused.py) where the model is Llama-shaped (both kinds usually are):
fused q/k/v and gate/up products and one layer function, compiled on a GPU (`compile=None`: compile where
there is a GPU; `compile=True`: compile also on a CPU, and compile the modules' step where the fused one
does not apply).
`fused=False` keeps the modules' step for decoding too.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from forgather.models.causal_lm import sample_rows
from forgather.models.kv_cache import SlotKVCache, SlotRows

from .decode_attention import advance_inputs, greedy_advance
from .fused import FusedDecoder, UnsupportedModel
from .scheduler import EngineStopped, Plan, QueueFull, Request, Scheduler

__all__ = ["Engine", "EngineStopped", "QueueFull", "UnsupportedModel"]


class SlotMask:
    """The attention mask of a step over cache slots, in the shape Forgather's attention functions read:
    `dense` [B, 1, T, keys] (True: visible), and a flex-attention `block_mask` built on demand."""

    is_plain_causal = False
    document_ids = None

    def __init__(self, positions: torch.Tensor, num_keys: int):
        self.positions, self.num_keys = positions, num_keys
        self.num_queries = positions.shape[1]
        self.query_offset = 0
        self.device = positions.device
        self.dense = torch.arange(num_keys, device=positions.device)[None, None, None, :] <= positions[:, None, :, None]

    @property
    def block_mask(self) -> Any:
        from torch.nn.attention import flex_attention as flex

        positions = self.positions
        return flex.create_block_mask(lambda b, h, q, kv: kv <= positions[b, q], positions.shape[0], None,
                                      self.num_queries, self.num_keys, device=str(self.device))


class ForgatherStep:
    """The forward pass of a Forgather model (the exported wrapper's `model.model`) over cache slots."""

    def __init__(self, model: Any):
        self.inner = model.model
        attention = self.inner.layers[0].attention
        self.num_layers, self.kv_heads, self.head_dim = len(self.inner.layers), attention.num_kv_heads, attention.head_dim

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: SlotRows, last: torch.Tensor | None
                 ) -> torch.Tensor:
        inner = self.inner
        x = inner.embed(ids)
        rope = inner.rope(positions) if inner.rope is not None else None
        mask = SlotMask(positions, rows.keys)
        for layer, cache in zip(inner.layers, rows.layers):
            x = layer(x, rope, mask, cache)
        return F.linear(inner.norm(_last(x, last)), inner.lm_head_weight)


class HuggingFaceStep:
    """The forward pass of a transformers Llama-family model over cache slots."""

    ATTENTION = ("sdpa", "eager")  # the implementations that honour an explicit 4-D mask

    def __init__(self, model: Any):
        import inspect

        self.model, self.inner, config = model, model.model, model.config
        if config._attn_implementation not in self.ATTENTION:
            raise UnsupportedModel(f"attention {config._attn_implementation!r}; the engine runs {self.ATTENTION}")
        self.num_layers, self.kv_heads = config.num_hidden_layers, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # transformers renamed the layers' cache argument (past_key_values -> cache)
        parameters = inspect.signature(self.inner.layers[0].forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: SlotRows, last: torch.Tensor | None
                 ) -> torch.Tensor:
        inner = self.inner
        x = inner.embed_tokens(ids)
        rotary = inner.rotary_emb(x, positions)
        visible = SlotMask(positions, rows.keys).dense
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, torch.finfo(x.dtype).min)
        for layer in inner.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary,
                      use_cache=True, **{self.cache_argument: rows})
            x = x[0] if isinstance(x, tuple) else x
        return self.model.lm_head(inner.norm(_last(x, last)))


def _last(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """[B, T, H] -> [B, H] at each row's `last` index (default: the last position)."""
    return x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]


POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")  # transformers' rope types that read the positions on the host


def model_step(model: Any) -> ForgatherStep | HuggingFaceStep:
    """The step for a loaded model; UnsupportedModel when it is neither kind (or spread over devices)."""
    if len({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        raise UnsupportedModel("the model is spread over several devices (device_map)")
    if any(parameter.is_meta for parameter in model.parameters()):
        raise UnsupportedModel("its weights are offloaded (device_map): each forward loads them, module by module")
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "lm_head_weight") and hasattr(inner, "layers"):
        return ForgatherStep(model)
    if inner is not None and all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        rope_type = getattr(inner.rotary_emb, "rope_type", "default")
        if rope_type in POSITION_DEPENDENT_ROPE:
            raise UnsupportedModel(f"rope_type {rope_type!r} recomputes its frequencies from the positions each step "
                                   f"(a host decision a step's CUDA graph cannot hold)")
        return HuggingFaceStep(model)
    raise UnsupportedModel(f"{type(model).__name__} is neither a Forgather model nor a Llama-family one")


def _buckets(most: int, least: int = 1) -> list[int]:
    """least, 2 least, 4 least ... below `most`, then `most`."""
    sizes = [least << i for i in range(most.bit_length()) if least << i < most]
    return sizes + [most]


def _default_attention(device: torch.device) -> str:
    """The fused decoder's attention unless told: the Triton kernel on a GPU that runs it (triton installed,
    bf16 tensor cores: compute capability 8.0 or later), else the matmul path."""
    from forgather.triton_support import triton_runs

    return "triton" if triton_runs(device, least=(8, 0)) else "matmul"


FUSED_MATMUL_BELOW_HIDDEN = 4096  # hidden sizes from which cuBLAS's products are the default (measured: 7B)


def _default_matmul(device: torch.device, attention: str, hidden_size: int) -> str:
    """The fused decoder's products unless told: "fused_down" (the norms and the SwiGLU inside our q/k/v and
    gate/up kernels, and the down product ours, split-K) where our kernels run with programmatic dependent
    launch (Hopper) and the model is narrower than FUSED_MATMUL_BELOW_HIDDEN, else "torch". On the H200, batch
    1: at the 1.24B shape (hidden 2048) "fused" was 1.02x cuBLAS's products; "fused_down" with its tilings
    timed in a graph (decode_attention.TUNER = "graph", the default) 948.8 and 948.6 tokens/s in two
    processes, against 921.7 and 910.2 for "fused" under Triton's autotuner (1.03-1.04x; before the graph
    tuner, "fused_down" was 0.98-1.06x "fused" from process to process). At the 7B shape (hidden 4096) "fused"
    was 0.94x cuBLAS's (docs/benchmarks.md). Without PDL ours are no faster."""
    from .decode_attention import dependent_launch

    fused = attention == "triton" and dependent_launch(device) and hidden_size < FUSED_MATMUL_BELOW_HIDDEN
    return "fused_down" if fused else "torch"


def _typical_prefills(slots: int, prefill_chunk: int, context_length: int) -> list[tuple[int, int]]:
    """The (rows, tokens) a GPU engine's prefill runs once at startup: one prompt of a whole chunk, and 1 to 16
    prompts of 128 tokens (a burst of requests; the scheduler packs them up to `prefill_chunk` tokens).
    Without it the first requests after startup paid a one-time cost (the first burst of 8 prompts waited
    95 ms for its first tokens, the same burst again 21 ms, H200: docs/benchmarks.md): kernels loaded on
    first use and the allocator's first blocks of each size."""
    width = min(128, prefill_chunk, context_length)
    shapes = [(1, min(prefill_chunk, context_length))]
    shapes += [(rows, width) for rows in _buckets(min(slots, 16)) if rows * width <= max(prefill_chunk, width)]
    return list(dict.fromkeys(shapes))


def _without_cudnn_attention(forward: Callable) -> Callable:
    """`forward` with torch's SDPA choosing among its other kernels than cuDNN's. cuDNN's attention builds a
    plan for each new shape it meets, and a prefill's shapes (rows x prompt width x keys) are new at almost
    every burst of requests: on the H200 the first burst of 8 prompts waited 153 ms for its first token with
    cuDNN and 31 ms without (benchmarks.md, serving). The flags are process-wide, so they are set for the
    call and put back after it (the engine's thread is the only one running the model)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        with sdpa_kernel(backends):
            return forward(*args, **kwargs)

    return call


MIN_KEYS = 256  # the shortest window of cache positions a decode step attends over


class Engine:
    """Args: `slots` concurrent sequences; `context_length` tokens each (prompt + completion);
    `prefill_chunk` prompt tokens per step while others decode; `max_waiting` queued requests before
    QueueFull; `cuda_graphs` (default: on a GPU) captures the decode step; `fused` (default: where the
    model allows) decodes through FusedDecoder; `compile` (default: on a GPU, the fused decoder) compiles
    the decode step first (True: also the modules' step of a model the fused decoder cannot run);
    `fused_attention` is its attention (fused.decode_layer; default: "triton" on a GPU where triton is
    installed, the one-launch kernel of decode_attention.py, else "matmul"; also "sdpa" or "reduce") and
    `fused_matmul` its products ("torch": F.linear; "triton": decode_attention.skinny_linear for up
    to 16 rows; "fused": that kernel with the norms before q/k/v and gate/up and the SwiGLU after gate/up
    inside, output and down by F.linear; "fused_down": that and the down product ours too, split-K, the default
    where our kernels launch with PDL on a model narrower than 4096 (_default_matmul); "fused_all": every
    product ours;
    steps of more than 16 rows use "torch"); `lookahead`
    (default: where the step is graphed) queues the next greedy step before reading this one's tokens
    (module docstring); `compile_prefill` runs the prompts' forward passes through torch.compile (dynamic
    shapes, compiled at startup for one and several rows of one and several tokens, so that no request waits
    for a compile) where they run eagerly by default; `warm_prefill` (default: on a GPU) runs the eager prefill
    once at startup at typical shapes (_typical_prefills), writing only scratch positions."""

    def __init__(self, model: Any, stop_token_ids: set[int], slots: int = 8, context_length: int = 2048,
                 prefill_chunk: int = 2048, max_waiting: int = 64, cuda_graphs: bool | None = None,
                 compile: bool | None = None, fused: bool | None = None, fused_attention: str | None = None,
                 lookahead: bool | None = None, fused_matmul: str | None = None, compile_prefill: bool = False,
                 warm_prefill: bool | None = None):
        self.step = model_step(model)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.stop_token_ids = frozenset(stop_token_ids)
        self.context_length = context_length
        self.cache = SlotKVCache(self.step.num_layers, slots, context_length, self.step.kv_heads,
                                 self.step.head_dim, self.dtype, self.device)
        self.scheduler = Scheduler(slots, max_waiting, prefill_chunk)
        on_gpu = self.device.type == "cuda"
        self.key_buckets = _buckets(context_length + 1, MIN_KEYS)
        self.key_ranges = {keys: torch.arange(keys, device=self.device) for keys in self.key_buckets}
        self.fused: FusedDecoder | None = None
        # The engine's own choices may fall back to torch's kernels; the caller's may not.
        fallback = fused_attention is None
        fallback_matmul = "torch" if fused_matmul is None else fused_matmul
        fused_attention = fused_attention or _default_attention(self.device)
        fused_matmul = fused_matmul or _default_matmul(self.device, fused_attention, weight.shape[1])
        if fused is not False:
            fuse = functools.partial(self._fuse, model, on_gpu if compile is None else compile)
            try:
                try:
                    fuse(fused_attention, fused_matmul)
                except Exception as error:  # the default kernels do not build or run here: torch's path does
                    if isinstance(error, UnsupportedModel) or not fallback or fused_attention == "matmul":
                        raise
                    warnings.warn(f"the decode kernels failed here ({type(error).__name__}: {error}); decoding "
                                  f"with fused_attention='matmul', fused_matmul={fallback_matmul!r}", stacklevel=2)
                    fuse("matmul", fallback_matmul)
            except UnsupportedModel as error:
                if fused:
                    raise
                if self.fused is not None:  # Llama-shaped by its classes, yet computing otherwise: say so
                    warnings.warn(f"decoding through the model's modules: {error}", stacklevel=2)
                self.fused = None
        # Shapes vary by bucket: after the first recompile dynamo makes them dynamic, so a few compiles serve all.
        compile_modules = bool(compile) and self.fused is None
        self.forward: Callable = torch.compile(self._forward) if compile_modules else self._forward
        self.prefill_forward: Callable = self._forward
        if on_gpu:
            self.prefill_forward = _without_cudnn_attention(self._forward)
        if compile_prefill:
            from torch._dynamo import mark_static

            from .fused import _compile

            # The cache's sizes never change: static, so that they are constants in the compiled graphs (with
            # dynamic shapes they would be symbols, and the kv-head count a SymBool that SDPA refuses).
            for tensor in (*self.cache.pairs, *self.cache.keys, *self.cache.values):
                mark_static(tensor)
            self.prefill_forward = _compile(self._forward)
            if on_gpu:
                self.prefill_forward = _without_cudnn_attention(self.prefill_forward)
            # dynamo specializes sizes of 1: one and two rows of one and three tokens compile all it needs
            self._warm_prefill([(rows, width) for rows in sorted({1, min(2, slots)}) for width in (1, 3)])
        elif on_gpu if warm_prefill is None else warm_prefill:
            self._warm_prefill(_typical_prefills(slots, prefill_chunk, context_length))
        # A decode step's inputs, ids and positions [2, batch], one tensor per batch bucket, read by that bucket's
        # step at every window. Each step ends by writing the next one's there and its greedy tokens to the host
        # (decode_attention.advance_inputs), so a step queued ahead is a graph replay and nothing else.
        self.step_inputs = {size: torch.stack((torch.zeros(size, dtype=torch.long, device=self.device),
                                               torch.full((size,), self.cache.scratch, device=self.device)))
                            for size in _buckets(slots)}
        # Everything the host gives or takes goes through pinned memory: asynchronous, no wait for the GPU. Two
        # of each, used in turn (self.turn flips at every launch): between a step's launch and the host's read of
        # its tokens at most one more step is launched (the one queued ahead), and it uses the other.
        # One pair per batch bucket, so that what is copied is contiguous: torch copies a strided host tensor
        # through a contiguous temporary in pageable memory, not from the pinned buffer itself.
        self.host_inputs = {size: torch.zeros((2, 2, size), dtype=torch.long, pin_memory=on_gpu)
                            for size in _buckets(slots)}
        # written per row: numpy's item assignment costs ~0.1 us
        self.host_arrays = {size: inputs.numpy() for size, inputs in self.host_inputs.items()}
        self.step_tokens = torch.zeros((2, slots), dtype=torch.long, pin_memory=on_gpu)  # the steps' greedy ids
        self.turn = 0
        self.host_tokens = torch.zeros(slots, dtype=torch.long, pin_memory=on_gpu)  # sampled ids
        # The step queued ahead: (the _decode key it assumed, its outputs), or None.
        self.ahead: tuple[tuple, tuple[torch.Tensor, torch.Tensor, int]] | None = None
        # (batch, window, turn) -> (graph, its outputs: logits and greedy ids); its inputs are step_inputs[batch]
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        if on_gpu if cuda_graphs is None else cuda_graphs:
            self._capture()
        self.lookahead = bool(self.graphs) if lookahead is None else lookahead
        self.thread = threading.Thread(target=self._loop, name="forgather-engine", daemon=True)
        self.thread.start()

    @property
    def slots(self) -> int:
        return self.scheduler.slots

    # --- the app's side ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: Any, deliver: Callable[[int | str | BaseException], None]
               ) -> Request:
        """Queue a completion; QueueFull when the queue is at its bound. `params` is a SamplingParams."""
        if not prompt_ids or len(prompt_ids) + params.max_tokens > self.context_length:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {params.max_tokens} completion tokens do not fit "
                             f"the engine's {self.context_length}-token cache slots")
        request = Request(list(prompt_ids), params, deliver)
        self.scheduler.submit(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop generating for `request`; its slot is free before the next step."""
        self.scheduler.cancel(request)

    def close(self) -> None:
        """Stop after the step that runs: every request left, running or waiting, ends with EngineStopped (the
        server is shutting down), and so does every later submit."""
        self.scheduler.close()
        self.thread.join(timeout=60)

    # --- the engine's thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """Steps until closed. An error that escapes a step (run_step fails only the step's requests) stops the
        engine: its requests, and later ones, get EngineStopped naming it, instead of waiting for a dead thread."""
        try:
            with torch.inference_mode():
                while (plan := self.scheduler.plan()) is not None:
                    self.run_step(plan)
        except BaseException as error:
            self.scheduler.close(EngineStopped(f"the serving engine failed and stopped ({type(error).__name__}: "
                                               f"{error}); the server's log has the traceback: restart the server"))
            raise
        finally:
            for request in self.scheduler.drain():
                self._deliver(request, self.scheduler.stopped)

    def run_step(self, plan: Plan) -> None:
        """One step: prompt chunks (if any), then one decode token for every decoding request. Where a part fails
        for several requests, each runs again alone and only those that fail alone fail (with the error): one
        request's fault (a row whose logits are not numbers, a prompt the model cannot embed) ends no other."""
        if plan.prefill:
            for chunks, outcome in self._each_alone_on_failure(self._prefill_tokens, plan.prefill):
                if isinstance(outcome, Exception):
                    self._fail([request for request, _, _ in chunks], outcome)
                    continue
                for request, _, stop in chunks:
                    self.scheduler.prefilled(request, stop)
                self._hand_out([request for request, _, stop in chunks if stop == len(request.prompt_ids)], outcome)
        if plan.decode:
            for requests, outcome in self._each_alone_on_failure(self._decode_tokens, plan.decode):
                if isinstance(outcome, Exception):
                    self._fail(requests, outcome)
                else:
                    self._hand_out(requests, outcome)

    def _each_alone_on_failure(self, compute: Callable[[list], list[int]], items: list) -> list[tuple[list, Any]]:
        """[(items, compute(items))]; where that raises for several items, [([item], compute([item]) or its
        error)] for each. `compute` changes nothing a second run could not redo (it writes the same cache
        positions again); what it returns is handed out by the caller, once."""
        try:
            return [(items, compute(items))]
        except Exception as error:
            self.ahead = None  # a step queued by the failed run assumed every item
            if len(items) == 1:
                return [(items, error)]
        outcomes = []
        for item in items:
            try:
                outcomes.append(([item], compute([item])))
            except Exception as error:
                self.ahead = None
                outcomes.append(([item], error))
        return outcomes

    def _prefill_tokens(self, chunks: list[tuple[Request, int, int]]) -> list[int]:
        """Prefill the chunks; the first token of each request whose prompt they complete."""
        logits = self._prefill(chunks)
        done = [i for i, (request, _, stop) in enumerate(chunks) if stop == len(request.prompt_ids)]
        return self._sample(logits[done], [chunks[i][0] for i in done]) if done else []

    def _decode_tokens(self, requests: list[Request]) -> list[int]:
        """One decode step of `requests`; each one's next token."""
        logits, greedy, turn = self._decode(requests)
        rows = [None] * logits.shape[0]
        for request in requests:
            rows[request.slot] = request
        ready = self._sample_on_device(logits, rows, greedy, turn)
        if self.lookahead:
            self._queue_next(requests)
        tokens = self._read(ready)
        return [tokens[request.slot] for request in requests]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: slice | torch.Tensor, keys: int,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] ids at [B, T] positions of `slots`, attending over their first `keys` cache positions ->
        the logits [B, V] at each row's `last` index (default the last)."""
        return self.step(ids, positions, self.cache.rows(slots, positions, keys), last)

    def _prefill(self, chunks: list[tuple[Request, int, int]]) -> torch.Tensor:
        """Put the prompt chunks (request, start, stop) in the cache in one forward pass, shorter chunks padded
        with tokens that write scratch; the logits [chunks, V] of each chunk's last token."""
        width = max(stop - start for _, start, stop in chunks)
        ids = [request.prompt_ids[start:stop] + [0] * (width - stop + start) for request, start, stop in chunks]
        positions = [list(range(start, stop)) + [self.cache.scratch] * (width - stop + start)
                     for _, start, stop in chunks]
        slots = torch.tensor([request.slot for request, _, _ in chunks], device=self.device)
        last = torch.tensor([stop - start - 1 for _, start, stop in chunks], device=self.device)
        # At least two keys: dynamo specializes a size of 1, and a compiled prefill would compile again for a
        # one-token prompt (the extra key is past every row's position: masked).
        keys = max(2, max(stop for _, _, stop in chunks))
        return self.prefill_forward(torch.tensor(ids, device=self.device),
                                    torch.tensor(positions, device=self.device), slots, keys, last)

    def _warm_prefill(self, shapes: list[tuple[int, int]]) -> None:
        """Run the prefill once for each (rows, tokens) of `shapes`, over a window of as many keys (at least two,
        as _prefill's), each row writing only the scratch position of its slot."""
        with torch.inference_mode():
            for rows, width in shapes:
                ids = torch.zeros((rows, width), dtype=torch.long, device=self.device)
                positions = torch.full((rows, width), self.cache.scratch, device=self.device)
                self.prefill_forward(ids, positions, torch.arange(rows, device=self.device), max(2, width),
                                     torch.full((rows,), width - 1, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _chained_step(self, size: int, keys: int, turn: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step of slots 0..size-1 from step_inputs[size], which it then advances to the next step's
        (its greedy tokens at the next positions), its greedy tokens stored in step_tokens[turn] on the host."""
        inputs, host = self.step_inputs[size], self.step_tokens[turn, :size]
        if self.fused is not None:  # the argmax's second stage and the advance in one kernel on a GPU
            logits = self.fused.step(inputs[0], inputs[1], self.key_ranges[keys])
            return logits, greedy_advance(logits, inputs, self.cache.scratch, host)
        logits = self.forward(inputs[0][:, None], inputs[1][:, None], slice(0, size), keys)
        greedy = logits.argmax(dim=-1)
        advance_inputs(inputs, greedy, self.cache.scratch, host)
        return logits, greedy

    def _fuse(self, model: Any, compile: bool, attention: str, matmul: str) -> None:
        """self.fused: the model's FusedDecoder, checked against its modules (UnsupportedModel otherwise)."""
        self.fused = FusedDecoder.from_model(model, self.cache, compile, attention, matmul)
        self._check_fused()

    def _check_fused(self) -> None:
        """UnsupportedModel unless the fused decoder computes what the model's modules compute: one step of
        two rows at the scratch position through the modules, each layer's input and output recorded, and
        each piece of the fused step given the same input (`FusedDecoder.compare`). Classes are recognized by
        name, so a project's own class named like ours (an RMSNorm that is a LayerNorm, say) is caught here."""
        rows = min(2, self.slots)
        ids = torch.arange(1, rows + 1, device=self.device)
        positions = torch.full((rows,), self.cache.scratch, device=self.device)
        keys = self.key_buckets[0]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            given = args[0] if args else kwargs["hidden_states"]
            seen.append((given.reshape(rows, -1), (output[0] if isinstance(output, tuple) else output).reshape(rows, -1)))

        inner = self.step.inner
        hooks = [module.register_forward_hook(record, with_kwargs=True) for module in (*inner.layers, inner.norm)]
        try:
            with torch.inference_mode():
                logits = self._forward(ids[:, None], positions[:, None], slice(0, rows), keys)
                error = self.fused.compare(ids, positions, self.key_ranges[keys], seen, logits)
        finally:
            for hook in hooks:
                hook.remove()
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not error < tolerance:
            raise UnsupportedModel(f"the fused decode step does not compute what the model's modules do (relative "
                                   f"error {error:.3g}, tolerance {tolerance:g} in {self.dtype})")

    def _decode(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Feed each request's last token at its position; rows of other slots in the bucket write scratch.
        Attention reads the shortest window of cache positions (a bucket) that holds every request's. The
        step queued ahead is used where it assumed these requests at these positions."""
        key = self._key(requests, 0)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == key:
            return ahead[1]
        return self._launch(requests, key, 0)

    def _key(self, requests: list[Request], advance: int) -> tuple:
        """(batch bucket, key window, (request, position) each) of a step `advance` tokens from now."""
        size = next(b for b in _buckets(self.slots) if b > max(r.slot for r in requests))
        keys = next(k for k in self.key_buckets if k > max(r.position for r in requests) + advance)
        return size, keys, tuple((request, request.position + advance) for request in requests)

    def _launch(self, requests: list[Request], key: tuple, advance: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Queue the decode step of `key` (_key) -> (logits, greedy ids, the turn whose step_tokens get its greedy
        ids). `advance` 0: the requests' last tokens at their positions, copied from the host; 1: the step after
        the one launched last, whose inputs that step wrote on the device (the same requests, all greedy)."""
        size, keys, _ = key
        self.turn ^= 1
        if not advance:
            array = self.host_arrays[size][self.turn]
            array[0, :size], array[1, :size] = 0, self.cache.scratch
            for request in requests:
                array[0, request.slot], array[1, request.slot] = request.last_token, request.position
            self.step_inputs[size].copy_(self.host_inputs[size][self.turn], non_blocking=True)
        graph = self.graphs.get((size, keys, self.turn))
        if graph is None:
            return (*self._chained_step(size, keys, self.turn), self.turn)
        graph[0].replay()
        return (*graph[1], self.turn)

    def _queue_next(self, requests: list[Request]) -> None:
        """Queue the step after this one, fed on the device with this step's greedy tokens, where that step is
        known: every row greedy, none at its last token, every next position inside the cache."""
        if any(r.params.temperature != 0 or r.generated + 1 >= r.params.max_tokens
               or r.position + 1 >= self.context_length for r in requests):
            return
        key = self._key(requests, 1)
        self.ahead = key, self._launch(requests, key, 1)

    def _capture(self) -> None:
        """Two CUDA graphs of the decode step for each batch and key-window bucket, one per turn (the host
        buffer its tokens go to), largest first, sharing one memory pool (one graph runs at a time)."""
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size, keys in sorted(((s, k) for s in _buckets(self.slots) for k in self.key_buckets), reverse=True):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up off the capture: lazy init, autotuning, compilation
                    for _ in range(3):
                        self._chained_step(size, keys, 0)
                torch.cuda.current_stream(self.device).wait_stream(side)
                for turn in (0, 1):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        outputs = self._chained_step(size, keys, turn)
                    self.graphs[size, keys, turn] = (graph, outputs)

    def _sample(self, logits: torch.Tensor, rows: list[Request | None], greedy: torch.Tensor | None = None
                ) -> list[int]:
        """One token per row: greedy rows by one argmax (`greedy`, when the step computed it), the others
        each by their own parameters."""
        return self._read(self._sample_on_device(logits, rows, greedy))

    def _sample_on_device(self, logits: torch.Tensor, rows: list[Request | None], greedy: torch.Tensor | None = None,
                          turn: int | None = None) -> tuple[torch.Tensor, Any]:
        """Where the host reads _sample's tokens: (a host tensor, an event for when they are there (None on the
        CPU)). Where every row is greedy and `turn` says which step_tokens a decode step stored its greedy ids
        in, those; otherwise tokens sampled here (not in a graph's output), whose copy to the host is queued."""
        if turn is not None and all(request is None or request.params.temperature == 0 for request in rows):
            return self.step_tokens[turn, :greedy.shape[0]], self._recorded(greedy)
        tokens = logits.argmax(dim=-1) if greedy is None else greedy.clone()
        sampled = [(index, request) for index, request in enumerate(rows)
                   if request is not None and request.params.temperature != 0]
        for _, request in sampled:
            if request.generator is None:
                seed = request.params.seed
                seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                request.generator = torch.Generator(device=logits.device).manual_seed(seed)
        if sampled:  # every sampled row at once, each drawn by its own generator
            index = torch.tensor([i for i, _ in sampled], device=logits.device)
            tokens[index] = sample_rows(
                logits.index_select(0, index), [r.params.temperature for _, r in sampled],
                [r.params.top_p if r.params.top_p < 1.0 else None for _, r in sampled],
                [r.generator for _, r in sampled])
        host = self.host_tokens[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        return host, self._recorded(tokens)

    @staticmethod
    def _recorded(tokens: torch.Tensor) -> Any:
        """An event recorded after the work queued so far (None on the CPU)."""
        if not tokens.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def _read(ready: tuple[torch.Tensor, Any]) -> list[int]:
        """The sampled ids on the host: the step's one wait for the GPU, without the GIL (Event.synchronize
        releases it: the app's threads run meanwhile), and not for a step queued after them."""
        host, event = ready
        if event is not None:
            event.synchronize()
        return host.tolist()

    def _hand_out(self, requests: list[Request], tokens: list[int]) -> None:
        for request, token in zip(requests, tokens):
            if request.cancelled:
                continue  # reaped before the next step
            if token in self.stop_token_ids:
                self._end(request, "stop")
                continue
            request.generated += 1
            request.last_token = token
            self._deliver(request, token)
            if request.generated == request.params.max_tokens:
                self._end(request, "length")

    def _end(self, request: Request, outcome: str | BaseException) -> None:
        self.scheduler.finish(request)
        self._deliver(request, outcome)

    def _fail(self, requests: list[Request], error: Exception) -> None:
        for request in requests:
            if request.slot is not None:
                self._end(request, error)

    def _deliver(self, request: Request, item: int | str | BaseException) -> None:
        try:
            request.deliver(item)
        except Exception:  # the receiver is gone (its event loop closed): nobody waits for this request
            self.scheduler.cancel(request)
