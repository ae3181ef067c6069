"""Learning-rate schedules as multipliers of the peak rate: `f(step) -> factor`, for `LambdaLR`.

Configs bind the shape with a partial (`!partial:forgather.optim.schedules:warmup_cosine {...}`); LambdaLR
then calls it with the step. Plain functions of the step, so schedules resume exactly from a checkpoint.
"""

from __future__ import annotations

import math

from forgather.models.checks import is_number


def _check(schedule: str, warmup_steps: int, total_steps: int | None = None, **ratios: float) -> None:
    """Refuse the settings that give a schedule no meaning (LambdaLR calls it at step 0 when it is built, so
    a bad value is named then, with the override that set it)."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"{schedule}: warmup_steps={warmup_steps!r} must be a whole number of steps, 0 or more")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"{schedule}: total_steps={total_steps!r} must be a whole number of steps, 1 or more "
                         "(it is the run's max_steps; set max_steps)")
    for name, ratio in ratios.items():
        if not is_number(ratio) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{schedule}: {name}={ratio!r} must be a number from 0 to 1")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def warmup_constant(step: int, *, warmup_steps: int = 0) -> float:
    """Linear warmup to the peak, then constant."""
    _check("warmup_constant", warmup_steps)
    return _warmup(step, warmup_steps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then a half cosine from the peak down to `min_ratio` of it at `total_steps`."""
    _check("warmup_cosine", warmup_steps, total_steps, min_ratio=min_ratio)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, *, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2) -> float:
    """Warmup-stable-decay (Hu et al., 2024): warmup, a long constant phase, then linear decay to zero over
    the last `decay_fraction` of training."""
    _check("warmup_stable_decay", warmup_steps, total_steps, decay_fraction=decay_fraction)
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
