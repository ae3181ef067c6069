"""The 1.24B training step's matrix products under cuBLAS settings, each setting in its own process (issue 17).

The step's profile on an H200 (docs/benchmarks.md, eighteenth session) puts 77% of its device time in cuBLAS
products and shows a ~1 us memset launched before almost every one (~250 a step, each with its own launch
gap). This times each product of a layer (forward `x @ w.T`, the input's gradient `dy @ w`, the weight's
gradient `dy.T @ x`) and the head's on one 2,048-token loss chunk, as a loop of back-to-back calls between
CUDA events (so a memset and its gap count), and counts the memsets one call launches (torch.profiler).
Beside the layer's products as the model makes them (q, k, v, o, gate, up, down) it times the fused widths
(q/k/v as one 3,072-wide product, k/v as one 1,024-wide, gate/up as one 16,384-wide) that a single stored
parameter would give, and sums a step's worth (16 layers and 4 loss chunks) of each.

Settings (environment variables, read when cuBLAS starts, hence one process each):
- default: torch's own choice;
- lt: `TORCH_BLAS_PREFER_CUBLASLT=1` (torch calls cuBLASLt directly, with its workspace);
- ws0: `CUBLAS_WORKSPACE_CONFIG=:0:0` (no workspace for cuBLAS);
- lt-ws0: both of the above and `CUBLASLT_WORKSPACE_SIZE=0` (torch 2.11 on an H100 fails at its first product:
  "OOM trying to allocate workspace for cublaslt"; the table leaves a failed setting out).

The loops keep their operands warm in L2, so the step's products run a few percent slower than these (H100:
82.1 ms a step in the training profile against 78.4 summed here); compare settings and widths, not absolutes.

`--energy SECONDS` also runs a whole step's products in the default's widths (q/k/v and gate/up as one; each
layer's forwards, the head's 4 chunks, then each layer's gradients in reverse) over and over for that long and
prints their energy a token (bench_energy.measure: NVML's energy counter, nvidia-smi's clock and power): the
floor a training step's energy stands on at the power limit, against which the rest of the step's energy (and
HF + Liger's, `bench_train.py --clocks`) can be set. Random bf16 operands (power depends on the data: zeros
draw less). `bench_energy.py` measures the step's other pieces the same way.

    python scripts/bench_matmuls.py [--iters 20] [--settings default lt ...] [--energy 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "lt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},
    "ws0": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"},
    "lt-ws0": {"TORCH_BLAS_PREFER_CUBLASLT": "1", "CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"},
}
TOKENS, HIDDEN, LAYERS, VOCAB, CHUNK, CHUNKS = 8192, 2048, 16, 128256, 2048, 4
# name -> (output width N, input width K, rows M, calls a step); the layer's products as the model makes them,
# then the fused widths
PRODUCTS: dict[str, tuple[int, int, int, int]] = {
    "q": (2048, HIDDEN, TOKENS, LAYERS), "k": (512, HIDDEN, TOKENS, LAYERS), "v": (512, HIDDEN, TOKENS, LAYERS),
    "o": (2048, 2048, TOKENS, LAYERS), "gate": (8192, HIDDEN, TOKENS, LAYERS), "up": (8192, HIDDEN, TOKENS, LAYERS),
    "down": (HIDDEN, 8192, TOKENS, LAYERS), "head": (VOCAB, HIDDEN, CHUNK, CHUNKS),
    "qkv": (3072, HIDDEN, TOKENS, LAYERS), "kv": (1024, HIDDEN, TOKENS, LAYERS),
    "gate_up": (16384, HIDDEN, TOKENS, LAYERS),
}
LAYOUTS = ("forward", "dgrad", "wgrad")
STEPS = {"separate": ("q", "k", "v", "o", "gate", "up", "down", "head"),
         "fused kv": ("q", "kv", "o", "gate", "up", "down", "head"),
         "fused qkv, gate_up": ("qkv", "o", "gate_up", "down", "head")}


def step_order(members: tuple[str, ...]) -> list[tuple[str, str]]:
    """(product, layout) in a training step's order: each layer's forwards, the head's chunks (forward and both
    gradients, as the fused loss makes them), then each layer's gradients in reverse."""
    layer = [p for p in members if p != "head"]
    order = [(p, "forward") for _ in range(LAYERS) for p in layer]
    order += [("head", layout) for _ in range(CHUNKS) for layout in LAYOUTS]
    order += [(p, layout) for _ in range(LAYERS) for p in reversed(layer) for layout in ("dgrad", "wgrad")]
    return order


def step_products(members: tuple[str, ...]):
    """One step's products of these widths (`step_order`) on random bf16 operands, as a callable."""
    import torch

    operands = {}
    for name in members:
        n, k, m, _ = PRODUCTS[name]
        operands[name] = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in ((m, k), (n, k), (m, n))]
    calls = dict(zip(LAYOUTS, (lambda x, w, dy: x @ w.t(), lambda x, w, dy: dy @ w, lambda x, w, dy: dy.t() @ x)))
    order = [(calls[layout], operands[name]) for name, layout in step_order(members)]

    def step() -> None:
        for call, args in order:
            call(*args)
    return step


def step_energy(seconds: float, members: tuple[str, ...]) -> dict:
    """One step's products run back to back for `seconds` (bench_energy.measure): ms and energy a step."""
    from bench_energy import energy_counter, measure

    return measure(step_products(members), seconds, energy_counter())


def worker(iters: int, energy: float = 0.0) -> dict:
    import torch
    from bench_step_pieces import timed  # this directory is the script's: first on sys.path
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(50):  # the clocks up before the first timing
        big @ big
    for name, (n, k, m, _) in PRODUCTS.items():
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        calls = {"forward": lambda: x @ w.t(), "dgrad": lambda: dy @ w, "wgrad": lambda: dy.t() @ x}
        for layout, call in calls.items():
            us = timed(call, iters) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            memsets = sum("memset" in e.name.lower() for e in kernels)
            names = sorted({e.name for e in kernels if "memset" not in e.name.lower()})
            results[f"{name} {layout}"] = dict(us=us, tflops=2 * m * n * k / us / 1e6, memsets=memsets,
                                               kernel=",".join(names)[:60])
        del x, w, dy
    if energy:
        results["energy"] = step_energy(energy, STEPS["fused qkv, gate_up"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--energy", type=float, default=0.0, metavar="SECONDS",
                        help="also run a step's products for this long under nvidia-smi: their energy a token")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.iters, args.energy)))
        return
    runs: dict[str, dict] = {}
    for setting in args.settings:
        env = {**os.environ, **SETTINGS[setting]}
        done = subprocess.run([sys.executable, __file__, "--worker", setting, "--iters", str(args.iters),
                               "--energy", str(args.energy)], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{setting}: failed\n{done.stderr[-2000:]}")
            continue
        runs[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    if not runs:
        sys.exit(1)
    names = list(runs)
    print("| product | " + " | ".join(f"{s} us | TFLOP/s | memsets" for s in names) + " | kernel (first) |")
    print("| --- | " + " | ".join("---: | ---: | ---:" for _ in names) + " | --- |")
    energies = {setting: r.pop("energy") for setting, r in runs.items() if "energy" in r}
    for key in next(iter(runs.values())):
        cells = " | ".join(f"{r[key]['us']:.1f} | {r[key]['tflops']:.0f} | {r[key]['memsets']}" for r in runs.values())
        print(f"| {key} | {cells} | {runs[names[0]][key]['kernel']} |")
    print("\nA step's products (16 layers, 4 loss chunks; ms, from the loop times):\n")
    print("| products | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---:" for _ in names) + " |")
    for step, members in STEPS.items():
        cells = []
        for r in runs.values():
            ms = sum(r[f"{p} {lay}"]["us"] * PRODUCTS[p][3] for p in members for lay in LAYOUTS) / 1e3
            cells.append(f"{ms:.2f}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    if energies:
        print(f"\nA step's products run back to back ({STEPS['fused qkv, gate_up']}, {args.energy:.0f} s each):\n")
        print("| setting | ms a step | SM MHz | W | power cap | mJ a token |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for setting, e in energies.items():
            if "mj_per_token" not in e:
                print(f"| {setting} | {e['ms_per_step']:.2f} | | | | |")
                continue
            capped = "" if e.get("power_capped") is None else f"{100 * e['power_capped']:.0f}%"
            mhz = f"{e['sm_mhz']:.0f}" if "sm_mhz" in e else ""
            print(f"| {setting} | {e['ms_per_step']:.2f} | {mhz} | {e['mean_power_w']:.0f} | {capped} "
                  f"| {e['mj_per_token']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**runs, **{f"{s} energy": e for s, e in energies.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
