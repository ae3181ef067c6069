"""The serving decoder's Triton kernels against what they replace, one batch-1 decode layer's pieces at a time
(GPU): each product of the 1.24B and 7B layers through cuBLAS (F.linear) and through skinny_linear (autotuned),
with `--fusions` the norm + product (+ SwiGLU after gate/up) fusions against their eager torch paths, and the
decode-attention kernel against the matmul path (decode_attention.reference, compiled as the decoder runs it). Each is checked against its baseline, then timed as a
CUDA graph of 100 calls; prints a table of microseconds per call, the ratio, and the weights' bandwidth.

    python scripts/bench_decode_kernels.py [--rows 1] [--shapes 1b 7b] [--windows 256 1024] [--fusions] [--json F]
                                           [--chunks 32 64 256]  (the attention's split, each timed)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forgather.models.norm import rms_norm  # noqa: E402
from forgather.serve import decode_attention  # noqa: E402
from forgather.serve.tuning import captured  # noqa: E402
from forgather.serve.decode_attention import (  # noqa: E402
    launch, launch_skinny, reference, residual_add, workspace)

SHAPES = {  # hidden, heads, kv_heads, head_dim, intermediate
    "1b": (2048, 32, 8, 64, 8192),
    "7b": (4096, 32, 32, 128, 11008),
    "tiny": (64, 4, 2, 16, 128),  # a CPU rehearsal: TRITON_INTERPRET=1 ... --device cpu --shapes tiny
}


def graph_time_us(fn, calls: int = 100) -> float:
    """Microseconds per call of `fn`, replayed as one CUDA graph of `calls` calls (no launch gaps from Python);
    on a CPU (a rehearsal under the Triton interpreter) the wall time of one call."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    graph = captured(fn, calls, warmups=3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


def relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["1b"], choices=sorted(SHAPES))
    parser.add_argument("--fusions", action="store_true", help="also the norm and SwiGLU fusions (compiles more)")
    parser.add_argument("--windows", type=int, nargs="+", default=[256])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chunks", type=int, nargs="+", default=[],
                        help="decode attention: time each least chunk of keys a program (decode_attention.MIN_CHUNK)")
    args = parser.parse_args()
    default_chunk = decode_attention.MIN_CHUNK
    torch.manual_seed(0)
    device = args.device
    dtype, rows_out = torch.bfloat16 if device == "cuda" else torch.float32, []

    def row(name: str, baseline_us: float, mine_us: float, error: float, nbytes: int | None = None) -> None:
        r = dict(name=name, baseline_us=baseline_us, triton_us=mine_us, speedup=baseline_us / mine_us,
                 relative_error=error)
        if nbytes:
            r["triton_tb_s"], r["baseline_tb_s"] = nbytes / mine_us / 1e6, nbytes / baseline_us / 1e6
        rows_out.append(r)
        print(json.dumps(r), flush=True)

    for shape in args.shapes:
        hidden, heads, kv_heads, head_dim, inner = SHAPES[shape]
        x = torch.randn(args.rows, hidden, device=device, dtype=dtype)
        delta = torch.randn_like(x)
        norm_weight = torch.ones(hidden, device=device, dtype=dtype)
        products = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
                    "gate_up": (2 * inner, hidden), "down": (hidden, inner)}
        for name, (outputs, inputs) in products.items():
            weight = torch.randn(outputs, inputs, device=device, dtype=dtype) * inputs ** -0.5
            a = torch.randn(args.rows, inputs, device=device, dtype=dtype)
            error = relative(launch_skinny(a, weight, None), F.linear(a, weight))
            row(f"{shape} {name} product", graph_time_us(lambda: F.linear(a, weight)),
                graph_time_us(lambda: launch_skinny(a, weight, None)), error, weight.numel() * 2)
            if args.fusions and name in ("qkv", "gate_up"):
                gated = name == "gate_up"

                def torch_path():
                    y = F.linear(rms_norm(residual_add(x, delta), norm_weight, 1e-5), weight)
                    if not gated:
                        return y
                    gate, up = y.chunk(2, dim=-1)
                    return F.silu(gate) * up

                def fused():
                    return launch_skinny(x, weight, None, delta=delta, norm_weight=norm_weight, eps=1e-5, gated=gated)

                error = relative(fused()[0], torch_path())
                row(f"{shape} add + norm + {name}" + (" + SwiGLU" if gated else ""), graph_time_us(torch_path),
                    graph_time_us(fused), error, weight.numel() * 2)
        for keys in args.windows:
            length = max(4096, keys) if device == "cuda" else keys + 8
            cache = torch.randn(2, args.rows, kv_heads, length + 1, head_dim, device=device, dtype=dtype)
            qkv = torch.randn(args.rows, heads + 2 * kv_heads, head_dim, device=device, dtype=dtype)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
            angles = torch.randn(args.rows, head_dim // 2, device=device)
            cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
            positions = torch.full((args.rows,), keys - 1, device=device)
            compiled = torch.compile(reference, dynamic=False)  # what the matmul path runs: inductor's kernels
            baseline_us = graph_time_us(lambda: compiled(q, k, v, cos, sin, positions, cache, keys))
            for chunk in args.chunks or [decode_attention.MIN_CHUNK]:
                decode_attention.MIN_CHUNK = chunk  # split_plan's least keys a program (workspace sized by it)
                partial, counter = workspace(args.rows, kv_heads, head_dim, length + 1, device)
                error = relative(launch(q, k, v, cos, sin, positions, cache.clone(), keys, partial, counter),
                                 reference(q, k, v, cos, sin, positions, cache.clone(), keys))
                splits, _ = decode_attention.split_plan(args.rows, kv_heads, keys, decode_attention.BLOCK_N)
                row(f"{shape} attention, window {keys}" + (f", {splits} splits (chunk {chunk})" if args.chunks else ""),
                    baseline_us,
                    graph_time_us(lambda: launch(q, k, v, cos, sin, positions, cache, keys, partial, counter)), error)
            decode_attention.MIN_CHUNK = default_chunk
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)"
    print(f"\n# {name}, torch {torch.__version__}, {args.rows} row(s), {dtype}\n")
    print("| piece | cuBLAS / torch us | Triton us | speedup | TB/s (torch -> Triton) | rel. error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows_out:
        bandwidth = (f"{r['baseline_tb_s']:.2f} -> {r['triton_tb_s']:.2f}" if "triton_tb_s" in r else "")
        print(f"| {r['name']} | {r['baseline_us']:.2f} | {r['triton_us']:.2f} | {r['speedup']:.2f}x | {bandwidth} | "
              f"{r['relative_error']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
