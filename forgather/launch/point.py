"""The side of a sweep that runs inside a point's own process: `python -m forgather.run OVERRIDES` with
FORGATHER_SWEEP_POINT=DIR (its run directory) in the environment, set by the launcher.

`run_recorded` runs the point and records how it ended in `DIR/outcome.json`, whatever happens: ok with the
final metrics, pruned (an Optuna trial stopped early), diverged (its weights, or a trial's metric, went NaN: a
result of its values, which Optuna is told as pruned), or failed with the error's root cause in one line and what
the point printed for it. An Optuna trial's settings arrive in FORGATHER_TRIAL (JSON: storage, study,
trial id, metric, pruner): the point then reports its validation metric to the trial as it trains.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from forgather.errors import causes, did_you_mean, report
from forgather.launch.base import LAUNCHER_PID_ENV, write_outcome
from forgather.run_lock import first_rank

TRIAL_ENV = "FORGATHER_TRIAL"
SWEEP_POINT_ENV = "FORGATHER_SWEEP_POINT"  # set by the launcher: the point's run directory


def end_with_launcher(poll_s: float = 0.5) -> None:
    """SIGTERM this point, once, when the process that started it dies: a launcher killed outright (the OOM
    killer, submitit's SIGKILL a second after the Ctrl-C it passes on) otherwise left its points training on,
    orphans holding their GPUs and their run directories' locks. The point's job control turns the SIGTERM into
    a checkpoint and an exit, and the sweep's --resume continues it. Only in a process a Forgather launcher
    started (LAUNCHER_PID_ENV), and in the ranks that process starts.

    A thread that watches the parent's pid, not Linux's parent-death signal (prctl): strace showed that one
    delivered twice, and job control takes a second SIGTERM for "stop at once, nothing saved"."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return
    import signal
    import threading

    parent = os.getppid()
    if parent != int(launcher):  # a wrapper between them, or the launcher already gone
        try:
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except PermissionError:  # another user's process: the pid is taken, so alive
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="forgather-end-with-launcher", daemon=True).start()


def misnamed_metric(metric: str, logged) -> str:
    """"did you mean 'val/loss'?" when `metric` is a misspelling of a logged metric's name, else "" (strict:
    val/loss is no misspelling of train/loss, but a point that did not validate)."""
    return did_you_mean(metric, list(logged), cutoff=0.85)


def run_recorded(run_dir: Path, run: Callable[[list[Any]], dict[str, float] | None]) -> int:
    """Call `run(callbacks)` (the callbacks to add to the trainer) and record its outcome in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    callbacks = []
    trial = json.loads(os.environ[TRIAL_ENV]) if os.environ.get(TRIAL_ENV) else None
    if trial:
        from forgather.launch.trial import ReportToTrial

        callbacks.append(ReportToTrial(**trial))
    record: dict[str, Any] = {"started": started}
    try:
        metrics = run(callbacks) or {}
    except Exception as error:
        buffer = io.StringIO()
        code = report(error, buffer)
        sys.stderr.write(buffer.getvalue())
        root = list(causes(error))[-1]
        # A diverged point (forgather.callbacks.divergence) is a result of its values, kept by a resumed sweep.
        status = "diverged" if type(root).__name__ == "TrainingDiverged" else "failed"
        record.update(status=status, error=f"{type(root).__name__}: {root}".splitlines()[0], report=buffer.getvalue())
    else:
        code = 0
        pruned = any(getattr(c, "pruned", False) for c in callbacks)
        record.update(status="pruned" if pruned else "ok", metrics=metrics)
        if trial and not pruned and trial["metric"] not in metrics:  # a trial's result is its metric
            logged = ", ".join(sorted(metrics)) or "nothing"
            record.update(status="failed", error=f"the point logged no {trial['metric']} (sweeper.metric); it logged {logged}")
            hint = misnamed_metric(trial["metric"], metrics) or "choose one with sweeper.metric=NAME, or validate before the run ends"
            record["report"] = f"error: {record['error']} ; {hint}\n"
            code = 2
        elif trial and not pruned and math.isnan(metrics[trial["metric"]]):  # Optuna would fail it, and a resume rerun it
            record.update(status="diverged", error=f"{trial['metric']} is nan: these values do not train")
    record.update(ended=time.time(), intermediate={str(k): v for c in callbacks for k, v in getattr(c, "reported", {}).items()})
    if first_rank():
        write_outcome(run_dir, record)  # the point's first rank speaks for it (Lightning reruns this command per rank)
    return code
