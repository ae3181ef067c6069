"""Does StepProfiler's window time a step as the timed steps do? On a GPU: a synthetic training step (16 bf16
4096 x 4096 products over 8,192 rows, fused AdamW) timed over 10 steps as the profile's window is (events, no
wait at its start), then profiled over 10 after the profiler's warm-up step; prints both and the profile's table,
and exits non-zero when the two differ by more than TOLERANCE (the profiler's start once stalled the window's
first step: idle gaps no other step had).

    python scripts/check_step_profiler.py [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_train import StepProfiler, timed_steps  # noqa: E402

TOLERANCE = 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    width, rows, layers = (4096, 8192, 16) if cuda else (256, 512, 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    model = model.to(args.device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), fused=cuda)
    x = torch.randn(rows, width, device=args.device, dtype=dtype)

    def step() -> None:
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    # past the clocks' ramp: the first GPU run's 10 steps after 5 ran 5% slower than its 3 profiled ones; after 20,
    # timed with events, still 4% (H100, 2026-12-05): now as many steps on each side
    for _ in range(20):
        step()
    timed = timed_steps(step, 10, args.device)
    summary = StepProfiler(args.device, "check").profile(step, 10)
    profiled = summary["wall_ms_per_step"]
    print(f"timed {timed:.2f} ms a step, profiled {profiled:.2f} ({profiled / timed:.3f}x), "
          f"{summary['kernels']} kernels\n{summary['table']}")
    if cuda and abs(profiled / timed - 1) > TOLERANCE:
        raise SystemExit(f"the profiled step is {profiled / timed:.3f}x the timed one (tolerance {TOLERANCE})")


if __name__ == "__main__":
    main()
