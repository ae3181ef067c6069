"""How long the packed attention kernels' grids take to drain, modelled on the CPU from the bench's own rows.

Each program of forgather/models/packed_attention_kernels.py loops over a number of tiles that depends on where
its block sits in its document: a query block late in a long document visits many key tiles, a key block early
in one visits many query blocks. The GPU hands programs out in the grid's order (axis 0 fastest) to whichever
slot frees first, so a long program dispatched near the end leaves the other slots idle while it finishes. This
counts each program's iterations on the training bench's rows (`bench_step_pieces.stdlib_documents`, 4 x 2,048
tokens, 8 kv heads), replays the dispatch as greedy list scheduling over `slots` (SMs x programs an SM, from the
kernels' registers: scripts/packed_kernel_registers.py) at one time unit an iteration plus OVERHEAD a program,
and prints the time to drain the grid in three orders:

    grid         the grid's plain order (the kernels' before 2026-12-05)
    heavy first  each block index for every (batch row, kv head) before the next, the blocks that carry the most
                 work in a long document first (the kernels' `_program` since)
    sorted       longest program first (the list-scheduling ideal, which needs the work known ahead)

beside the bound max(total / slots, longest program). A model, not a measurement: it ignores that programs
sharing an SM slow each other and that the hardware's dispatch is only roughly in order; the GPU's answer
(bench_step_pieces.py --duel, 2026-12-05): 1.24x on the attention of those rows, docs/benchmarks.md.

    python scripts/packed_schedule.py [--overhead 2]
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
from pathlib import Path

import torch

from forgather.models.attention import document_bounds

KV_HEADS = 8
SMS = 132  # H200
# (kernel, BLOCK_M, BLOCK_N, programs an SM at the committed kernels' registers: forward 163, dq 98, dk/dv 243)
KERNELS = [("forward", 16, 64, 3), ("dq", 16, 32, 5), ("dkdv", 16, 64, 2)]


def query_block_work(start: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Key tiles each query block visits [B, T / block_m]: from its first query's document start, down to a tile
    boundary, to its last query."""
    length = start.shape[1]
    first = start[:, ::block_m].long() // block_n * block_n
    last = torch.clamp(torch.arange(block_m, length + block_m, block_m), max=length)
    return -((first - last) // block_n)


def key_block_work(end: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Query blocks each key block visits [B, T / block_n]: from its first key to the end of its last key's
    document."""
    length = end.shape[1]
    lo = torch.arange(0, length, block_n) // block_m
    last_key = torch.clamp(torch.arange(block_n, length + block_n, block_n), max=length) - 1
    return -(-end[:, last_key].long() // block_m) - lo


def drain_time(works: list[float], slots: int, overhead: float) -> float:
    """Greedy list scheduling: each program, in order, starts on the slot that frees first."""
    free = [0.0] * slots
    for work in works:
        heapq.heappush(free, heapq.heappop(free) + work + overhead)
    return max(free)


def orders(work: torch.Tensor, heavy_last_blocks: bool) -> dict[str, list[float]]:
    """The programs' work [B, blocks] in each dispatch order (every kv head of a row has the same work)."""
    batch, blocks = work.shape
    grid = [float(work[b, block]) for b in range(batch) for _ in range(KV_HEADS) for block in range(blocks)]
    ranks = range(blocks - 1, -1, -1) if heavy_last_blocks else range(blocks)
    heavy = [float(work[b, block]) for block in ranks for b in range(batch) for _ in range(KV_HEADS)]
    return {"grid": grid, "heavy first": heavy, "sorted": sorted(grid, reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead", type=float, default=2.0, help="a program's fixed cost, in iterations")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_step_pieces", Path(__file__).with_name("bench_step_pieces.py"))
    pieces = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pieces)
    start, end = document_bounds(pieces.stdlib_documents(4, 2048))
    print("| kernel | programs | iterations mean / max | grid | heavy first | sorted | bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, block_m, block_n, per_sm in KERNELS:
        if name == "dkdv":
            work = key_block_work(end, block_m, block_n)
        else:
            work = query_block_work(start, block_m, block_n)
        slots = SMS * per_sm
        times = {order: drain_time(works, slots, args.overhead)
                 for order, works in orders(work, heavy_last_blocks=name != "dkdv").items()}
        programs = work.numel() * KV_HEADS
        bound = max((work.sum().item() * KV_HEADS + programs * args.overhead) / slots,
                    work.max().item() + args.overhead)
        print(f"| {name} {block_m}x{block_n}, {per_sm} an SM | {programs} | {work.float().mean():.1f} / "
              f"{work.max()} | {times['grid']:.0f} | {times['heavy first']:.0f} ({times['grid'] / times['heavy first']:.2f}x) "
              f"| {times['sorted']:.0f} | {bound:.0f} |")


if __name__ == "__main__":
    main()
