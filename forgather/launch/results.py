"""A sweep's results, written to its directory when it ends (and again after a resume):

- `results.json`: every point (number, status, overrides as key: value, final metrics, error, start and end
  times) and what the sweeper adds (Optuna: the best trial).
- `results.csv`: one row a point, a column per swept key and per metric.
- `tb_hparams/`: TensorBoard's HParams view over every finished point (`tensorboard --logdir ROOT/tb_hparams`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from forgather.data.cache import atomic_write
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
    atomic_write(root / "results.json", lambda path: path.write_text(json.dumps({"points": rows, **summary}, indent=1)))
    swept = [key for key in dict.fromkeys(k for row in rows for k in row["overrides"]) if len({str(r["overrides"].get(key)) for r in rows}) > 1]
    metrics = sorted({key for row in rows for key in row["metrics"]})

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["number", "status", *swept, *metrics, "error"])
            for row in rows:
                writer.writerow([row["number"], row["status"], *(row["overrides"].get(k, "") for k in swept), *(row["metrics"].get(k, "") for k in metrics), row["error"]])

    atomic_write(root / "results.csv", write_csv)
    _write_hparams(root / "tb_hparams", rows, swept)


def _write_hparams(directory: Path, rows: list[dict[str, Any]], swept: list[str]) -> None:
    """TensorBoard's own HParams summaries (tensorboard.plugins.hparams.summary_v2, no TensorFlow or torch
    needed): the experiment (swept keys, metrics) at the top, one run a finished point, its final metrics as
    scalars named `hparam/<metric>`."""
    import shutil
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    if directory.exists():  # written whole each time: a resumed sweep's view holds every point once
        shutil.rmtree(directory)

    def write(path: Path, *summaries: Summary) -> None:
        writer = EventFileWriter(str(path))
        for summary in summaries:
            writer.add_event(Event(wall_time=time.time(), step=0, summary=summary))
        writer.close()

    finished = [row for row in rows if row["metrics"]]
    metrics = sorted({key for row in finished for key in row["metrics"]})
    write(directory, hp.hparams_config_pb(hparams=[hp.HParam(key) for key in swept], metrics=[hp.Metric(f"hparam/{key}") for key in metrics]))
    for row in finished:
        hparams = {key: row["overrides"].get(key, "") for key in swept}
        scalars = Summary(value=[Summary.Value(tag=f"hparam/{key}", simple_value=value) for key, value in row["metrics"].items()])
        write(directory / str(row["number"]), hp.hparams_pb(hparams, trial_id=str(row["number"])), scalars)
