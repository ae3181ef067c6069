"""Benchmark Adafactor: TritonAdafactor vs torch.optim.Adafactor and fused AdamW, side by side (GPU).

Defaults are the issue's shape: 24 fp32 tensors of 4096 x 10240 (~1.0B parameters) with random gradients.
Step time is the median of `--iters` steps timed with CUDA events after `--warmup` steps; state bytes count
every tensor in the optimizer's state. Also prints the time of `_foreach_add_(params, grads)`, which reads
the gradients and parameters and writes the parameters once: the floor for any optimizer step.

With `--dtype bf16` the parameters and gradients are bf16 (TritonAdafactor then rounds stochastically; the
`stochastic_rounding=False` row is its cost).

    python scripts/bench_adafactor.py [--tensors 24 --rows 4096 --cols 10240 --iters 20] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from typing import Callable

import torch

from forgather.optim import Adafactor, AdamW, TritonAdafactor

GIB = 2**30

OPTIMIZERS: dict[str, Callable] = {
    "torch Adafactor (foreach)": lambda p: torch.optim.Adafactor(p, foreach=True),
    "fused AdamW": lambda p: torch.optim.AdamW(p, fused=True),
    "forgather Adafactor (reference)": lambda p: Adafactor(p),
    "TritonAdafactor": lambda p: TritonAdafactor(p),
    "TritonAdafactor serpentine=False": lambda p: TritonAdafactor(p, serpentine=False),
    "TritonAdafactor tile 8x512x64 4 warps": lambda p: TritonAdafactor(p, tile=(8, 512, 64), num_warps=4),
    "TritonAdafactor tile 16x512x64 4 warps": lambda p: TritonAdafactor(p, tile=(16, 512, 64), num_warps=4),
    "TritonAdafactor tile 8x1024x64 4 warps": lambda p: TritonAdafactor(p, tile=(8, 1024, 64), num_warps=4),
    "TritonAdafactor beta1=0.9": lambda p: TritonAdafactor(p, beta1=0.9),
    "TritonAdafactor stochastic_rounding=False": lambda p: TritonAdafactor(p, stochastic_rounding=False),
    "forgather AdamW (stochastic rounding)": lambda p: AdamW(p),
    "forgather AdamW stochastic_rounding=False": lambda p: AdamW(p, stochastic_rounding=False),
}


def step_ms(step: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=10240)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated names from the table to run (default all)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if not torch.cuda.is_available():
        print("bench_adafactor needs CUDA", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    params = [torch.randn(args.rows, args.cols, device="cuda", dtype=dtype, requires_grad=True) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in params)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{args.tensors} {args.dtype} tensors of {args.rows} x {args.cols}: {n_params / 1e9:.2f}B parameters")
    grads = [p.grad for p in params]
    floor = step_ms(lambda: torch._foreach_add_([p.data for p in params], grads), args.warmup, args.iters)
    moved = 3 * params[0].element_size() * n_params
    print(f"read grads + read params + write params once: {floor:.2f} ms ({moved / floor / 1e9:.2f} TB/s)")

    wanted = set(filter(None, args.only.split(",")))
    rows = []
    for name, factory in OPTIMIZERS.items():
        if wanted and name not in wanted:
            continue
        optimizer = factory(params)
        ms = step_ms(optimizer.step, args.warmup, args.iters)
        rows.append((name, ms, state_bytes(optimizer)))
        print(f"{name}: {ms:.2f} ms/step, state {rows[-1][2] / GIB:.4f} GiB", flush=True)
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()

    torch_ms = next((ms for name, ms, _ in rows if name.startswith("torch Adafactor")), None)
    adamw_ms = next((ms for name, ms, _ in rows if name == "fused AdamW"), None)
    print()
    print("| optimizer | ms/step | state GiB | / torch Adafactor | / fused AdamW |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ms, nbytes in rows:
        r1 = f"{ms / torch_ms:.2f}" if torch_ms else "-"
        r2 = f"{ms / adamw_ms:.2f}" if adamw_ms else "-"
        print(f"| {name} | {ms:.2f} | {nbytes / GIB:.4f} | {r1} | {r2} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
