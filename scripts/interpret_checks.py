"""What the interpret_*.py scripts share: how far a kernel's outputs are from their reference, and the line
each case prints. (The scripts run as `python scripts/interpret_X.py`, so this folder is on sys.path.)"""

from __future__ import annotations

import torch


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference of `got` from `want`, relative to `want`'s largest magnitude (in fp32)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def relative_differences(names: list[str], got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    """relative_difference of each named output, in order."""
    return {name: relative_difference(a, b) for name, a, b in zip(names, got, want)}


def report(case: str, differences: dict[str, float]) -> float:
    """Prints the case and each output's difference on one line; returns the largest."""
    print(f"{case}: " + ", ".join(f"{name} {value:.1e}" for name, value in differences.items()), flush=True)
    return max(differences.values())
