"""The training step's kernels under Nsight Compute (issue 17): what bounds each one that is not a product.

Runs one forward + backward of two layers of the 1.24B shape (hidden 2,048, 32 / 8 heads of 64, SwiGLU of
8,192, bf16, each layer compiled as `compile=true` compiles it) on 4 rows of 2,048 tokens of the training
bench's own packed rows (`bench_step_pieces.stdlib_positions`), with `--attention` (packed by default) and
`--fused-norm` (the norms as our Triton ops). Only that step runs between cudaProfilerStart and
cudaProfilerStop, so under `ncu --profile-from-start off` the warm-up and the compilation are not profiled.

    ncu --clock-control none --profile-from-start off --csv --page details \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" \\
        --log-file OUT.csv python3 scripts/profile_kernels.py
    python3 scripts/profile_kernels.py --summarize OUT.csv    # a markdown table, one row per kernel

The table: duration, compute and memory throughput (% of peak), registers, grid and block, the
theoretical and achieved occupancy, and the three largest warp stall reasons (the cycles a warp waits for each,
per issued instruction).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def step(attention: str, layers: int, device: str, fused_norm: bool = False) -> None:
    import torch

    from bench_step_pieces import SHAPE, stdlib_positions
    from llama_model import llama

    s = SHAPE
    torch.manual_seed(0)
    model = llama(4096, s["hidden"], layers, s["heads"], s["intermediate"], kv_heads=s["kv_heads"],
                  attention_fn=attention, theta=10000.0, fused_norm=fused_norm, tie_embeddings=True)
    model = model.to(device=device, dtype=torch.bfloat16)
    for layer in model.layers:
        layer.compile()
    positions = stdlib_positions(s["batch"], s["seq"]).to(device)
    tokens = torch.randint(0, 4096, positions.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def once() -> None:
        model.zero_grad(set_to_none=True)
        model.hidden_states(tokens, positions).float().square().mean().backward()

    for _ in range(3):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        once()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}  # to us


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(path: str, top: int) -> str:
    """ncu's `--csv --page details` log -> a markdown table, kernels by duration."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    kernels: dict[tuple[str, str], dict[str, tuple[float | None, str]]] = defaultdict(dict)
    for record in csv.DictReader(lines[start:]):
        key = (record["ID"], record["Kernel Name"])
        kernels[key][record["Metric Name"]] = (_number(record["Metric Value"]), record["Metric Unit"])

    def metric(values, *names):
        for name in names:
            if name in values and values[name][0] is not None:
                value, unit = values[name]
                return value * TIME_UNITS.get(unit, 1.0)
        return None

    rows = []
    for (_, name), values in kernels.items():
        duration = metric(values, "Duration")
        stalls = [(value, match.group(1)) for metric_name, (value, _) in values.items()
                  if (match := STALL.fullmatch(metric_name)) and value is not None]
        stalls.sort(reverse=True)
        rows.append(dict(
            name=name[:60], us=duration, sm=metric(values, "Compute (SM) Throughput"),
            memory=metric(values, "Memory Throughput", "DRAM Throughput"),
            registers=metric(values, "Registers Per Thread"), grid=metric(values, "Grid Size"),
            block=metric(values, "Block Size"), theoretical=metric(values, "Theoretical Occupancy"),
            achieved=metric(values, "Achieved Occupancy"),
            stalls=", ".join(f"{label} {value:.1f}" for value, label in stalls[:3]),
        ))
    rows.sort(key=lambda r: -(r["us"] or 0))
    total = sum(r["us"] or 0 for r in rows)

    def cell(value, fmt):
        return "" if value is None else format(value, fmt)

    out = [f"{len(rows)} kernels, {total:.0f} us in all (the {top} longest below)", "",
           "| kernel | us | SM % | memory % | regs | grid | block | occupancy theor. / achieved % | top stalls |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows[:top]:
        out.append(f"| `{r['name']}` | {cell(r['us'], '.1f')} | {cell(r['sm'], '.0f')} | {cell(r['memory'], '.0f')} "
                   f"| {cell(r['registers'], '.0f')} | {cell(r['grid'], '.0f')} | {cell(r['block'], '.0f')} "
                   f"| {cell(r['theoretical'], '.0f')} / {cell(r['achieved'], '.0f')} | {r['stalls']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", default="packed", help="attention_fn of the layers (default packed)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--fused-norm", action="store_true", help="the norms as our Triton ops (fused_norm=true)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu rehearses the step without a profiler")
    parser.add_argument("--summarize", metavar="CSV", help="print the table of an ncu log instead of running")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize, args.top))
    else:
        step(args.attention, args.layers, args.device, args.fused_norm)


if __name__ == "__main__":
    main()
