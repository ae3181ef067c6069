"""Benchmark the causal-LM losses (forgather.loss): peak memory and forward+backward time, side by side.

Defaults are the issue's shape: 16384 tokens, hidden 4096, vocab 128256, bf16. Hidden states ~ N(0, 1) and
weight ~ N(0, 0.02^2) (a freshly initialised head). Peak memory is what a loss adds above its inputs during
one forward+backward, the gradients it returns included (grad hidden + grad weight = 1.10 GiB here, the floor
for any loss). Time is the median of `--iters` runs timed with CUDA events after `--warmup` runs. Also prints
the time of the three matmuls alone (logits, grad hidden, grad weight), the floor for every implementation.

    python scripts/bench_loss.py [--tokens 16384 --hidden 4096 --vocab 128256]
        [--impls naive,chunked,liger,cce,fused,liger:chunk_mem_const=4 ...]
"""

from __future__ import annotations

import argparse
import ast
import gc
import statistics
import sys

import torch

from forgather.loss import get_loss

GIB = 2**30
DEFAULT_IMPLS = (
    "naive,liger,liger:chunk_mem_const=2,liger:chunk_mem_const=4,liger:chunk_mem_const=8,cce,cce:filter_eps=None,"
    "chunked,chunked:chunk_size=512,chunked:chunk_size=2048,fused,fused:chunk_size=512,fused:chunk_size=2048"
)


def parse_impl(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value,...' (values as Python literals) -> (name, kwargs)."""
    name, _, options = spec.partition(":")
    kwargs = {}
    for item in filter(None, options.split(";")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def split_impls(text: str) -> list[str]:
    """Comma-separated specs; options inside one spec are separated by ';'."""
    return [s for s in text.split(",") if s]


def cuda_median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fresh_memory() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def measure(loss_fn, hidden, weight, labels, warmup: int, iters: int) -> tuple[float, float, float]:
    """(peak GiB above inputs, median ms of forward+backward, loss value)."""

    def fwd_bwd():
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        return loss

    ms = cuda_median_ms(fwd_bwd, warmup, iters)
    hidden.grad = weight.grad = None
    base = fresh_memory()
    loss = fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    value = loss.item()
    hidden.grad = weight.grad = None
    return peak, ms, value


def matmul_floor_ms(hidden, weight, warmup: int, iters: int) -> float:
    h, w = hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach()
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    grad_h, grad_w = torch.empty_like(h), torch.empty_like(w)

    def three_matmuls():
        torch.mm(h, w.t(), out=logits)
        torch.mm(logits, w, out=grad_h)
        torch.mm(logits.t(), h, out=grad_w)

    ms = cuda_median_ms(three_matmuls, warmup, iters)
    del logits, grad_h, grad_w
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help="comma-separated; options 'name:k=v;k=v'")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_loss needs CUDA", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    dtype, dev = torch.bfloat16, "cuda"
    hidden = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=dev)
    flops = 3 * 2 * args.tokens * args.hidden * args.vocab
    floor = matmul_floor_ms(hidden, weight, args.warmup, args.iters)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"shape: tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, bf16")
    print(f"three matmuls alone: {floor:.1f} ms ({flops / floor / 1e9:.0f} TFLOP/s)")

    rows = []
    for spec in split_impls(args.impls):
        name, kwargs = parse_impl(spec)
        try:
            loss_fn = get_loss(name, **kwargs)
            peak, ms, value = measure(loss_fn, hidden, weight, labels, args.warmup, args.iters)
        except Exception as exc:  # one failing implementation must not hide the others' numbers
            print(f"{spec}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append((spec, peak, ms, value))
        print(f"{spec}: peak {peak:.2f} GiB, {ms:.1f} ms, loss {value:.4f}", flush=True)
        del loss_fn
        torch._dynamo.reset()

    liger_ms = next((ms for spec, _, ms, _ in rows if spec == "liger"), None)
    libs = [peak for spec, peak, _, _ in rows if spec in ("liger", "cce")]
    best_lib_peak = min(libs) if libs else None
    print()
    print(f"| loss | peak GiB | fwd+bwd ms | time / Liger | peak / best library | loss |")
    print(f"| --- | ---: | ---: | ---: | ---: | ---: |")
    for spec, peak, ms, value in rows:
        t_ratio = f"{ms / liger_ms:.2f}" if liger_ms else "-"
        p_ratio = f"{peak / best_lib_peak:.2f}" if best_lib_peak else "-"
        print(f"| {spec} | {peak:.2f} | {ms:.1f} | {t_ratio} | {p_ratio} | {value:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
