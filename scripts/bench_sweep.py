"""Benchmark the local launcher: a 4-point sweep of tiny CPU runs with `launcher.jobs=2` against
`launcher.jobs=1`, side by side in one run (bar: jobs=2 takes <= 0.65x the wall time of jobs=1).

Each sweep is a fresh `python -m forgather.run -m` of the test suite's micro experiment (a 2-layer width-32
Llama, `--max-steps` steps) over four learning rates; rounds alternate jobs=1 and jobs=2 so that load from
elsewhere on the machine falls on both. Checks that both give the same final losses, prints a table and the
ratio of the medians.

    .venv/bin/python scripts/bench_sweep.py [--rounds 2] [--max-steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "runner_project"
POINTS = "lr=1e-3,2e-3,3e-3,4e-3"


def sweep(jobs: int, max_steps: int) -> tuple[float, list[float]]:
    """Wall time of one sweep and its points' final train/loss."""
    with tempfile.TemporaryDirectory() as outputs:
        command = [sys.executable, "-m", "forgather.run", "-p", str(PROJECT), "--outputs", outputs, "-m", "+experiment=micro"]
        command += [f"max_steps={max_steps}", POINTS, f"launcher.jobs={jobs}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        (root,) = (Path(outputs) / "multirun").iterdir()
        points = json.loads((root / "results.json").read_text())["points"]
        return seconds, [p["metrics"]["train/loss"] for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=12)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times: dict[int, list[float]] = {1: [], 2: []}
    losses: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for jobs in (1, 2):
            seconds, losses[jobs] = sweep(jobs, args.max_steps)
            times[jobs].append(seconds)
    same = all(abs(a - b) < 1e-4 for a, b in zip(losses[1], losses[2]))
    print(f"4 points x {args.max_steps} steps, {os.cpu_count()} cores, {args.rounds} rounds; same final losses: {same}")
    print(f"load average (1 min) before: {load:.2f}, after: {os.getloadavg()[0]:.2f} (other work on the machine slows both)")
    print("| launcher | wall s (median) | runs |")
    print("| --- | --- | --- |")
    for jobs in (1, 2):
        print(f"| local, jobs={jobs} | {statistics.median(times[jobs]):.1f} | {', '.join(f'{t:.1f}' for t in times[jobs])} |")
    ratio = statistics.median(times[2]) / statistics.median(times[1])
    print(f"jobs=2 / jobs=1: {ratio:.2f}x (bar <= 0.65x)")


if __name__ == "__main__":
    main()
