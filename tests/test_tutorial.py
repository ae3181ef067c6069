"""The tiny_llama tutorial's documented losses: the default run must reproduce the table in its README."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from forgather.run import main

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "examples" / "tutorials" / "tiny_llama"


def documented_validation_losses() -> dict[int, float]:
    text = (TUTORIAL / "README.md").read_text()
    steps = [int(s) for s in re.search(r"^\| step \|(.*)\|$", text, re.M).group(1).split("|")]
    values = re.search(r"^\| validation loss \|(.*)\|$", text, re.M).group(1).split("|")
    return {step: float(v) for step, v in zip(steps, values) if v.strip()}


def test_the_documented_table_shows_the_loss_clearly_falling():
    losses = documented_validation_losses()
    first, last = min(losses), max(losses)
    assert last == 600 and losses[first] - losses[last] > 1.0


@pytest.mark.slow
def test_the_default_run_reproduces_the_documented_validation_losses(tmp_path):
    assert main(["-p", str(TUTORIAL), "--outputs", str(tmp_path), "+experiment=tiny_llama"]) == 0
    (metrics,) = tmp_path.glob("outputs/tiny_llama/*/csv/metrics.csv")
    with open(metrics, newline="") as file:
        measured = {int(row["step"]) + 1: float(row["val/loss"]) for row in csv.DictReader(file) if row.get("val/loss")}
    for step, documented in documented_validation_losses().items():
        assert measured[step] == pytest.approx(documented, abs=0.1), f"validation loss at step {step}"
