"""Where the 1.24B training step's energy goes, piece by piece, at the GPU's power limit (issue 17).

Both bar paths run at the power limit (H100: ~690 of 700 W, 2026-12-06), so a step takes as long as its energy
takes to spend: a kernel made shorter moves tokens/s only as far as it spends less energy. Profiles give time,
not energy. This runs each piece of a step alone, a step's worth at a time (its count in one step of the 1.24B
shape), back to back for `--seconds`, and reads the energy the GPU spent from NVML's counter
(nvmlDeviceGetTotalEnergyConsumption) around it; nvidia-smi samples the SM clock and power meanwhile
(bench_train.GpuClocks). Pieces:

- products: the step's matrix products in the default's widths (bench_matmuls.step_order: 204 a step);
- attention: our packed-document kernels forward + backward (forgather.models.packed_attention, default tiles)
  on the training bench's own packed rows (bench_step_pieces.stdlib_documents), 16 a step;
- rotary: the fused q/k/v product rotated and split (forgather.models.fused_rotary) and its backward, 16;
- norms: the residual add + RMSNorm as our Triton ops forward + backward (fused_norm), 33 (two a layer and the
  final one, as CausalLM makes them);
- swiglu: silu(gate) * up, gate and up the layer's two products, compiled by inductor as in the step, forward +
  backward, 16; beside it (`--pieces swiglu-ours swiglu-liger`) our Triton op (fused_swiglu=true) and Liger's
  kernels (HF + Liger's);
- optimizer: TritonAdamW's step over the shape's bf16 parameters, 1;
- gate-copy: the two copies that give Liger's kernels fresh inputs at each call (they write their gradients over
  their inputs), 16: subtract it from swiglu-liger.

`--attention-sweep` instead measures the attention piece at each kernel's tilings (bench_step_pieces.PACKED_SWEEP)
and names the least energy's tiles as the training override.

Each piece but the optimizer runs as a CUDA graph of its step's worth, so host launches leave no gaps; the
optimizer is one launch. Operands are random bf16 (power depends on the data: zeros draw less), so the figures
are the pieces' own, not exactly what they spend inside a step, where they run at other clocks. The loss's
cross-entropy kernel, the embedding and the scaling kernels (~2 ms a step together on an H200) are left out:
the table says how much of the step the pieces add up to.

    python scripts/bench_energy.py [--seconds 10] [--pieces products attention ...] [--json FILE]
    python scripts/bench_energy.py --attention-sweep --seconds 3
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from bench_matmuls import STEPS, step_products
from bench_step_pieces import (PACKED_SWEEP, SHAPE, kernel_options, packed_inputs, packed_step, parameters_1b,
                               rotary_inputs, stdlib_documents, stdlib_positions)
from bench_train import GpuClocks

TOKENS = SHAPE["batch"] * SHAPE["seq"]
# a step of the 1.24B shape: how many of each piece (norms: two a layer and the final norm)
COUNTS = {"products": 1, "attention": SHAPE["layers"], "rotary": SHAPE["layers"], "norms": 2 * SHAPE["layers"] + 1,
          "swiglu": SHAPE["layers"], "optimizer": 1, "swiglu-ours": SHAPE["layers"], "swiglu-liger": SHAPE["layers"],
          "gate-copy": SHAPE["layers"]}


def energy_counter() -> Callable[[], float] | None:
    """Joules the GPU has spent since its driver loaded (NVML), or None where NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # noqa: BLE001 - no pynvml, or a GPU or sandbox without the counter: power x time instead
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3


def as_graph(fn: Callable[[], object], reps: int) -> Callable[[], None]:
    """`reps` calls of fn captured in one CUDA graph (its replay), or the calls themselves where capture fails."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(reps):
                fn()
    except Exception as error:  # noqa: BLE001 - a piece that cannot be captured runs from the host
        print(f"graph capture failed, run from the host: {type(error).__name__}: {str(error)[:200]}", flush=True)
        torch.cuda.synchronize()
        return lambda: [fn() for _ in range(reps)]
    return graph.replay


def products_step() -> Callable[[], None]:
    return step_products(STEPS["fused qkv, gate_up"])


def attention_step() -> Callable[[], None]:
    q, k, v, grad, bounds = packed_inputs(stdlib_documents(SHAPE["batch"], SHAPE["seq"]).cuda())
    return as_graph(packed_step(q, k, v, grad, bounds, None), COUNTS["attention"])


def rotary_step() -> Callable[[], None]:
    from forgather.models.fused_rotary import rotary_qkv

    s = SHAPE
    width = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    qkv = torch.randn(s["batch"], s["seq"], width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, _, (cos, sin), _ = rotary_inputs("cuda", torch.bfloat16, s, stdlib_positions(s["batch"], s["seq"]))
    grads = [torch.randn(s["batch"], heads, s["seq"], s["head_dim"], device="cuda", dtype=torch.bfloat16)
             for heads in (s["heads"], s["kv_heads"], s["kv_heads"])]

    def step() -> None:
        qkv.grad = None
        torch.autograd.backward(rotary_qkv(qkv, cos, sin, s["heads"], s["kv_heads"]), grads)
    return as_graph(step, COUNTS["rotary"])


def norms_step() -> Callable[[], None]:
    from forgather.models import fused_rms_norm

    s = SHAPE
    shape = (s["batch"], s["seq"], s["hidden"])
    x, delta = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dy, ds = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.ones(s["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step() -> None:
        for t in (x, delta, weight):
            t.grad = None
        total, y = fused_rms_norm.add_rms_norm(x, delta, weight, 1e-5)
        torch.autograd.backward([y, total], [dy, ds])
    return as_graph(step, COUNTS["norms"])


def gate_call(swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: str = "cuda",
              writes_inputs: bool = False, shape: tuple[int, int] = (TOKENS, SHAPE["intermediate"])
              ) -> Callable[[], None]:
    """silu(gate) * up forward + backward by `swiglu` on gate and up as the layer has them (two products), once.

    An op that writes its gradients over its inputs (Liger's: the layer's products are dead by then) would feed
    its own gradients back as the next call's inputs, which grow without bound and are NaN or zero within a
    hundred calls (random normal data, bf16) and draw less power; `writes_inputs` copies the first inputs back
    before each call (the piece gate-copy is these copies alone)."""
    gate, up = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    kept = (gate.detach().clone(), up.detach().clone()) if writes_inputs else ()

    def step() -> None:
        with torch.no_grad():
            for tensor, first in zip((gate, up), kept):
                tensor.copy_(first)
        gate.grad = up.grad = None
        swiglu(gate, up).backward(grad)
    return step


def gate_step(swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], writes_inputs: bool = False
              ) -> Callable[[], None]:
    """A step's worth of gate_call, as a CUDA graph."""
    return as_graph(gate_call(swiglu, writes_inputs=writes_inputs), COUNTS["swiglu"])


def gate_copy_step() -> Callable[[], None]:
    """The copies alone that restore an in-place op's inputs (gate_call's writes_inputs), a step's worth."""
    sources, targets = ([torch.randn(TOKENS, SHAPE["intermediate"], device="cuda", dtype=torch.bfloat16)
                         for _ in range(2)] for _ in range(2))

    def step() -> None:
        for target, source in zip(targets, sources):
            target.copy_(source)
    return as_graph(step, COUNTS["gate-copy"])


def swiglu_step() -> Callable[[], None]:
    """inductor's kernels, as the step compiles the layer's gate without fused_swiglu."""
    return gate_step(torch.compile(lambda gate, up: torch.nn.functional.silu(gate) * up))


def swiglu_ours_step() -> Callable[[], None]:
    """forgather.models.fused_swiglu (fused_swiglu=true)."""
    from forgather.models.fused_swiglu import swiglu

    return gate_step(swiglu)


def swiglu_liger_step() -> Callable[[], None]:
    """Liger's SwiGLU kernels (what HF + Liger's step runs), eager; with the copies of gate-copy (subtract it)."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return gate_step(LigerSiLUMulFunction.apply, writes_inputs=True)


def optimizer_step() -> Callable[[], None]:
    from forgather.optim import TritonAdamW

    optimizer = TritonAdamW(parameters_1b(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    return optimizer.step


PIECES = {"products": products_step, "attention": attention_step, "rotary": rotary_step, "norms": norms_step,
          "swiglu": swiglu_step, "optimizer": optimizer_step, "swiglu-ours": swiglu_ours_step,
          "swiglu-liger": swiglu_liger_step, "gate-copy": gate_copy_step}
DEFAULT_PIECES = ["products", "attention", "rotary", "norms", "swiglu", "optimizer"]  # the default step's


def measure(step: Callable[[], None], seconds: float, counter: Callable[[], float] | None) -> dict:
    """Runs `step` (one training step's worth of a piece) back to back for `seconds`: ms and joules a step."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    steps, start, end = 0, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with GpuClocks() as clocks:
        joules = counter() if counter else None
        begin = time.perf_counter()
        start.record()
        while time.perf_counter() - begin < seconds:
            step()
            steps += 1
            if steps % 4 == 0:  # the host no further than a few steps ahead of what is measured
                torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
        joules = counter() - joules if counter else None
    ms = start.elapsed_time(end) / steps
    result = {"ms_per_step": ms, "steps": steps, **(clocks.summary() or {})}
    if joules is None and "power_w" in result:  # no counter: the median power under load for the whole time
        joules = result["power_w"] * ms / 1e3 * steps
    if joules is not None:
        result.update(joules_per_step=joules / steps, mj_per_token=1e3 * joules / steps / TOKENS,
                      mean_power_w=joules / (ms / 1e3 * steps))
    return result


def attention_sweep(seconds: float, counter: Callable[[], float] | None) -> dict[str, dict[str, dict]]:
    """The attention piece at each kernel's tilings of bench_step_pieces.PACKED_SWEEP (the other two kernels at
    packed_attention.TILING's), by energy: the sweep that chose TILING went by time alone, and at the power limit a
    tiling that takes longer at lower power may cost the step less. Prints, last, the least energy's tiles of each
    kernel as the training override."""
    from forgather.models.packed_attention import KERNELS, tiling

    q, k, v, grad, bounds = packed_inputs(stdlib_documents(SHAPE["batch"], SHAPE["seq"]).cuda())
    results: dict[str, dict[str, dict]] = {}
    for kernel in KERNELS:
        for tiles in PACKED_SWEEP[kernel]:
            try:
                step = as_graph(packed_step(q, k, v, grad, bounds, tiling({kernel: tiles})), COUNTS["attention"])
                result = measure(step, seconds, counter)
            except Exception as error:  # noqa: BLE001 - a tiling this GPU cannot build is a row, not the end
                result = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            results.setdefault(kernel, {})[",".join(map(str, tiles))] = result
            print(json.dumps({"piece": "attention", "kernel": kernel, "tiles": tiles, **result}), flush=True)
            torch.cuda.empty_cache()
    return results


def sweep_table(results: dict[str, dict[str, dict]]) -> str:
    """One row a tiling, each kernel's least energy first, against its first (TILING's, PACKED_SWEEP's order)."""
    lines = ["| kernel | BLOCK_M, BLOCK_N, warps, stages | ms a step | mean W | mJ a token | vs the default's energy |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    best = {}
    for kernel, rows in results.items():
        done = {tiles: r for tiles, r in rows.items() if "mj_per_token" in r}
        default = done.get(next(iter(rows)))
        for tiles, r in sorted(done.items(), key=lambda item: item[1]["mj_per_token"]):
            ratio = f"{r['mj_per_token'] / default['mj_per_token']:.3f}" if default else ""
            lines.append(f"| {kernel} | {tiles} | {r['ms_per_step']:.2f} | {r['mean_power_w']:.0f} "
                         f"| {r['mj_per_token']:.4f} | {ratio} |")
        lines += [f"| {kernel} | {tiles} | {r['error']} | | | |" for tiles, r in rows.items() if "error" in r]
        if done:
            best[kernel] = [int(n) for n in min(done, key=lambda t: done[t]["mj_per_token"]).split(",")]
    return "\n".join(lines) + (f"\nleast energy: {kernel_options(best)}" if best else "")


def table(results: dict[str, dict]) -> str:
    lines = ["| piece (a step's worth) | count | ms a step | mean W | SM MHz | power cap | mJ a token |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {COUNTS[name]} | {r['error']} | | | | |")
            continue
        capped = "" if r.get("power_capped") is None else f"{100 * r['power_capped']:.0f}%"
        mhz = f"{r['sm_mhz']:.0f}" if "sm_mhz" in r else ""
        watts = f"{r['mean_power_w']:.0f}" if "mean_power_w" in r else ""
        energy = f"{r['mj_per_token']:.3f}" if "mj_per_token" in r else ""
        lines.append(f"| {name} | {COUNTS[name]} | {r['ms_per_step']:.2f} | {watts} | {mhz} | {capped} | {energy} |")
    done = [r for name, r in results.items() if name in DEFAULT_PIECES and "mj_per_token" in r]
    if done:
        lines.append(f"| the default step's pieces above, summed | | {sum(r['ms_per_step'] for r in done):.2f} "
                     f"| | | | {sum(r['mj_per_token'] for r in done):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each piece runs back to back")
    parser.add_argument("--pieces", nargs="+", choices=list(PIECES), default=DEFAULT_PIECES,
                        help="default: the default step's pieces (the sum row adds those of them that ran)")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="instead of the pieces: the packed attention kernels' tilings by energy")
    parser.add_argument("--json")
    args = parser.parse_args()
    counter = energy_counter()
    print(f"# {torch.cuda.get_device_name()}, energy from "
          f"{'NVML counter' if counter else 'median power x time (no NVML counter)'}", flush=True)
    if args.attention_sweep:
        sweep = attention_sweep(args.seconds, counter)
        print(sweep_table(sweep))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(sweep, f, indent=1)
        return
    results: dict[str, dict] = {}
    for name in args.pieces:
        try:
            results[name] = measure(PIECES[name](), args.seconds, counter)
        except Exception as error:  # noqa: BLE001 - a piece that fails is a row, the others still run
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        print(json.dumps({"piece": name, **results[name]}), flush=True)
        torch.cuda.empty_cache()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
