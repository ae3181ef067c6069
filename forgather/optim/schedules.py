"""Learning-rate schedules as multipliers of the peak rate: `f(step) -> factor`, for `LambdaLR`.

Configs bind the shape with a partial (`!partial:forgather.optim.schedules:warmup_cosine {...}`); LambdaLR
then calls it with the step. Plain functions of the step, so schedules resume exactly from a checkpoint.
"""

from __future__ import annotations

import math


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def warmup_constant(step: int, *, warmup_steps: int = 0) -> float:
    """Linear warmup to the peak, then constant."""
    return _warmup(step, warmup_steps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then a half cosine from the peak down to `min_ratio` of it at `total_steps`."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, *, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay (Hu et al., 2024): warmup, a long constant phase, then linear decay to zero over
    the last `decay_fraction` of training."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
