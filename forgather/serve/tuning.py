"""Choosing a decode kernel's tiling by timing it the way a decode step runs it.

Our skinny products (decode_attention.launch_skinny) have ~30 candidate tilings. Triton's autotuner times each
candidate call by call (triton.testing.do_bench: CUDA events around one launch of a few microseconds, with the
L2 cache flushed before it) and keeps the fastest. On the H200 its pick for the 1.24B layer's products
differed from process to process: the same engine decoded 890-950 tokens/s between calls while rows of one
call agreed to 1%, and which of two product sets was faster flipped between calls (docs/benchmarks.md,
2026-12-04). A decode step runs these kernels back to back inside one CUDA graph, under PDL each launching
while the one before runs, every one streaming its weights from HBM (a layer's weights are larger than L2).

`choose(key, candidates, run, copies)` times each candidate as that: a CUDA graph of `ROUNDS` passes over
`copies` launches, launch i reading the i-th copy of the weight (enough copies to outgrow L2 twice:
`copies_for`), and keeps the candidate with the least median time a launch over `REPLAYS` replays. Choices
are kept per key for the process. Triton's autotuner cannot do this: it calls the kernel with the arguments
it was given, so every timed launch reads the same weight, from L2 after the first.

Candidates that fail to build on this GPU (too much shared memory, say) are skipped, as Triton's autotuner
skips them; if none runs, the error says which product and the first failure.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Hashable

import torch

__all__ = ["captured", "choose", "copies_for", "graph_time_us", "chosen"]

L2_MULTIPLE = 2  # the copies of a weight hold at least this many times the L2 cache
MOST_COPIES = 16
ROUNDS = 4  # passes over the copies in one graph
REPLAYS = 5  # graph replays timed; the median counts

_CHOSEN: dict[Hashable, tuple[dict, float]] = {}


def chosen() -> dict[Hashable, tuple[dict, float]]:
    """Every choice of this process so far: key -> (the candidate, its microseconds a launch)."""
    return dict(_CHOSEN)


def copies_for(weight_bytes: int, l2_bytes: int) -> int:
    """How many copies of a weight of `weight_bytes` hold L2_MULTIPLE times `l2_bytes` (1 to MOST_COPIES)."""
    return min(MOST_COPIES, max(1, math.ceil(L2_MULTIPLE * l2_bytes / max(1, weight_bytes))))


def l2_bytes(device: torch.device) -> int:
    """The L2 cache of a CUDA device (50 MB where torch does not say: an H100's or H200's)."""
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


def captured(step: Callable[[], Any], calls: int, warmups: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of `step()`, replayed once and synchronized; `warmups` calls run first on
    a side stream, outside the graph (they compile the kernels)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            step()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_time_us(step: Callable[[], Any], rounds: int = ROUNDS, replays: int = REPLAYS) -> float:
    """Microseconds of one `step()` (a pass over the copies), as the median replay of a CUDA graph of `rounds`
    steps divided by `rounds`; the first step runs outside the graph (it compiles the kernel)."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a decode kernel met a new shape while a CUDA graph was being captured: its tiling is "
                           "chosen by timing, which cannot run inside a capture; run one step of that shape first")
    graph = captured(step, rounds)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / rounds)
    del graph
    return statistics.median(times)


def choose(key: Hashable, candidates: list[dict], run: Callable[[dict, int], Any], copies: int,
           timer: Callable[[Callable[[], Any]], float] = graph_time_us) -> dict:
    """The candidate with the least time a launch, `run(candidate, i)` launching once on the i-th of `copies`
    copies of the weight; remembered under `key` for the process (later calls return it without timing)."""
    if key in _CHOSEN:
        return _CHOSEN[key][0]
    best, best_us, failures = None, math.inf, []
    for candidate in candidates:
        def step(candidate: dict = candidate) -> None:
            for i in range(copies):
                run(candidate, i)

        try:
            us = timer(step) / copies
        except Exception as error:  # noqa: BLE001 - a tiling this GPU cannot build is skipped, not fatal
            failures.append(f"{candidate}: {type(error).__name__}: {str(error)[:200]}")
            continue
        if us < best_us:
            best, best_us = candidate, us
    if best is None:
        raise RuntimeError(f"no tiling of the decode product {key} ran on this device; the first failure: "
                           f"{failures[0] if failures else 'no candidates'}")
    _CHOSEN[key] = (best, best_us)
    return best
