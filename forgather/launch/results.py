"""A sweep's results, written to its directory when it ends (and again after a resume):

- `results.json`: every point (number, status, overrides as key: value, final metrics, error, start and end
  times) and what the sweeper adds (Optuna: the best trial).
- `results.csv`: one row a point, a column per swept key and per metric.
- `tb_hparams/`: TensorBoard's HParams view over every finished point (`tensorboard --logdir ROOT/tb_hparams`),
  through torch.utils.tensorboard's `add_hparams`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from forgather.launch.base import Outcome


def _value(text: str) -> Any:
    """An override's value as YAML reads it (1e-3 -> 0.001, adamw -> 'adamw')."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, str, bool)) else text


def overrides_of(outcome: Outcome) -> dict[str, Any]:
    pairs = (text.lstrip("+").split("=", 1) for text in outcome.overrides if "=" in text)
    return {key: _value(value) for key, value in pairs}


def write_results(root: Path, outcomes: list[Outcome], summary: dict[str, Any]) -> None:
    rows = [
        {
            "number": o.number,
            "status": o.status,
            "overrides": overrides_of(o),
            "metrics": o.metrics,
            "error": o.error,
            "started": o.started,
            "ended": o.ended,
        }
        for o in outcomes
    ]
    (root / "results.json").write_text(json.dumps({"points": rows, **summary}, indent=1))
    swept = [key for key in dict.fromkeys(k for row in rows for k in row["overrides"]) if len({str(r["overrides"].get(key)) for r in rows}) > 1]
    metrics = sorted({key for row in rows for key in row["metrics"]})
    with open(root / "results.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["number", "status", *swept, *metrics, "error"])
        for row in rows:
            writer.writerow([row["number"], row["status"], *(row["overrides"].get(k, "") for k in swept), *(row["metrics"].get(k, "") for k in metrics), row["error"]])
    _write_hparams(root / "tb_hparams", rows, swept)


def _write_hparams(directory: Path, rows: list[dict[str, Any]], swept: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    if directory.exists():  # written whole each time: a resumed sweep's view holds every point once
        import shutil

        shutil.rmtree(directory)
    with SummaryWriter(str(directory)) as writer:
        for row in rows:
            if row["metrics"]:
                hparams = {key: row["overrides"].get(key, "") for key in swept}
                writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in row["metrics"].items()}, run_name=str(row["number"]))
