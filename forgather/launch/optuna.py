"""`sweeper=optuna`: a search over a space written in the grammar of Hydra's Optuna sweeper, run by Optuna.

    lr='tag(log, interval(1e-4, 1e-2))'   a float, sampled on a log scale (tag(int, ...) for integers)
    batch_size=interval(2, 8)             a float in [2, 8]; interval() of two ints with tag(int) an int
    optimizer=choice(adamw,adafactor)     categorical; so is a comma list, optimizer=adamw,adafactor
    layers=range(2,8)                     an int from 2 to 7 (Python's range, as the basic sweeper reads it)

Other overrides are fixed for every trial; glob() is the basic sweeper's only. The study lives in SQLite in
the sweep directory (`optuna.db`), so `--resume MULTIRUN_DIR` continues it: trials that completed or were
pruned are kept, the failed and the interrupted ones are tried again with the same values, then the search
goes on to `n_trials`. A trial tried again is a new trial (Optuna numbers every ask); when the interrupted
one left a checkpoint (stopped by Ctrl-C, SIGTERM or a scheduler), the new trial takes over its directory,
renamed to the new number, and continues from the checkpoint, with the values it had reported up to it.
Trials run `n_jobs` at a time through the launcher (no more than it runs at once): each trial is a point in
its own process, which reports its validation `metric` to the trial as it trains (forgather.launch.trial), so
the pruner can stop it; the sweep then tells the study the final metric (a diverged trial is told as pruned:
its values are a result, not to be tried again). A seeded sampler (`seed`) makes the search repeatable. The
study keeps its objective: a resume with another direction, or another metric once values were told, is
refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from forgather import overrides as ovr
from forgather.errors import UserError, did_you_mean
from forgather.launch.base import Outcome
from forgather.launch.point import TRIAL_ENV, misnamed_metric
from forgather.launch.sweep import Plan, SweepContext, Sweeper, continues

DB_FILE = "optuna.db"
TAGS = ("int", "log")  # what tag() may say of an interval
CONTINUES = "continues"  # the user attribute of a trial asked again: the number of the trial it continues
METRIC = "metric"  # the study's user attribute: the metric its trials' values are


def make_pruner(settings: dict[str, Any]):
    import optuna

    if settings["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings["n_startup_trials"], n_warmup_steps=settings["n_warmup_steps"])


def load_study(storage: str, name: str, pruner: dict[str, Any]):
    """The study as a trial's process opens it (the same storage, the same pruner)."""
    import optuna

    return optuna.load_study(study_name=name, storage=_storage(storage), pruner=make_pruner(pruner))


def _storage(url: str):
    import optuna

    # Trials in several processes write to one SQLite file: wait for its lock instead of failing at once.
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """({key: optuna distribution} of the swept overrides, the fixed overrides' texts)."""
    from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from forgather.overrides import parse_hydra

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for item in parse_hydra(arguments):
        if not item.is_sweep_override():
            fixed.append(item.input_line)
            continue
        value, key = item.value(), item.get_key_element()
        if key in space:  # the later would silently replace the earlier
            raise ovr.OverrideError(f"{item.input_line}: {key} is searched twice ; give it one search space")
        if isinstance(value, Glob):
            raise ovr.OverrideError(f"{item.input_line}: glob() enumerates a group's options for the basic sweeper; with sweeper=optuna write choice(a,b,...)")
        for tag in sorted(set(value.tags) - set(TAGS)):  # Hydra's grammar takes any tag: a misspelled one would be ignored
            raise ovr.OverrideError(f"{item.input_line}: no tag {tag!r}{ovr.suggest(tag, list(TAGS))} (tags: {', '.join(TAGS)})")
        if isinstance(value, ChoiceSweep):
            space[key] = CategoricalDistribution([v for v, _ in ovr.sweep_values(item, None)])
        elif isinstance(value, RangeSweep):
            values = [v for v, _ in ovr.sweep_values(item, None)]  # an empty range is refused there
            integral = all(isinstance(v, int) for v in values)
            space[key] = IntDistribution(values[0], values[-1], step=int(value.step)) if integral and values and not value.shuffle else CategoricalDistribution(values)
        elif isinstance(value, IntervalSweep):
            if value.start >= value.end:
                raise ovr.OverrideError(f"{item.input_line}: an interval's start must be below its end")
            log = "log" in value.tags
            if log and value.start <= 0:
                raise ovr.OverrideError(f"{item.input_line}: a log interval needs a start above 0")
            if "int" in value.tags and not (float(value.start).is_integer() and float(value.end).is_integer()):
                raise ovr.OverrideError(f"{item.input_line}: an int interval needs whole-number bounds")
            if "int" in value.tags:
                space[key] = IntDistribution(int(value.start), int(value.end), log=log)
            else:
                space[key] = FloatDistribution(float(value.start), float(value.end), log=log)
        else:
            raise ovr.OverrideError(f"{item.input_line}: not a search space the Optuna sweeper knows (interval, choice, range, a,b)")
    if not space:
        raise ovr.OverrideError("sweeper=optuna searches over swept overrides: give at least one, e.g. 'lr=tag(log, interval(1e-4, 1e-2))'")
    return space, fixed


def _text(value: Any) -> str:
    """A sampled value as an override's value."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    return str(value)


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        n_trials: int = 20,
        n_jobs: int = 1,
        direction: str = "minimize",
        metric: str = "val/loss",
        seed: int | None = 0,
        sampler: str = "tpe",
        pruner: str = "median",
        n_startup_trials: int = 2,
        n_warmup_steps: int = 0,
        study_name: str = "sweep",
    ) -> None:
        for name, value, allowed in (("direction", direction, ("minimize", "maximize")), ("sampler", sampler, ("tpe", "random")),
                                     ("pruner", pruner, ("median", "none"))):
            if value not in allowed:
                hint = did_you_mean(str(value), allowed)
                raise UserError(f"sweeper.{name}={value}: give {' or '.join(allowed)}" + (f" ; {hint}" if hint else ""))
        for name, value, least in (("n_trials", n_trials, 1), ("n_jobs", n_jobs, 1), ("n_startup_trials", n_startup_trials, 0),
                                   ("n_warmup_steps", n_warmup_steps, 0)):
            if value < least:
                raise UserError(f"sweeper.{name}={value}: give {least} or more")
        if not metric:
            raise UserError("sweeper.metric is empty: name the logged metric the search optimizes, e.g. sweeper.metric=val/loss")
        self.n_trials, self.n_jobs, self.direction, self.metric, self.seed = n_trials, n_jobs, direction, metric, seed
        self.sampler, self.study_name = sampler, study_name
        self.pruner = {"name": pruner, "n_startup_trials": n_startup_trials, "n_warmup_steps": n_warmup_steps}
        self.best: dict[str, Any] = {}

    def _study(self, url: str):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=self.seed) if self.sampler == "tpe" else optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.create_study(storage=_storage(url), study_name=self.study_name, direction=self.direction, sampler=sampler, pruner=make_pruner(self.pruner), load_if_exists=True)

    def _open(self, root: Path, url: str):
        """The sweep's study. A sweep whose trials ran needs the study that numbered them: a new one (the file
        deleted or emptied, another study_name) would tell its trials the finished points' results, so it is
        refused, as is a file that does not read."""
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        db = root / DB_FILE
        ran = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
        restore = "restore it from a copy of the sweep, or start a new sweep"
        if ran and not (db.is_file() and db.stat().st_size):
            raise UserError(f"{db}: {'empty' if db.is_file() else 'missing'}, but the sweep ran trials "
                            f"{', '.join(map(str, ran))}, which the study numbers ; {restore}")
        try:
            names = optuna.study.get_all_study_names(_storage(url)) if ran else []
            if ran and self.study_name not in names:
                hint = did_you_mean(self.study_name, names) or f"its studies: {', '.join(names) or 'none'}"
                raise UserError(f"sweeper.study_name={self.study_name}: {db} holds no such study, but the sweep ran trials "
                                f"{', '.join(map(str, ran))} ; resume with the study_name they ran in ({hint})")
            study = self._study(url)
        except SQLAlchemyError as error:
            reason = str(getattr(error, "orig", None) or error).splitlines()[0]
            raise UserError(f"{db}: does not read as an Optuna study ({reason}) ; {restore}") from error
        self._check_objective(study, db)
        return study

    def _check_objective(self, study, db: Path) -> None:
        """A resumed study keeps the objective its trials were told: Optuna loads a study with the direction it
        was created with whatever is asked, and another metric would rank its values against the old ones (a
        study told no value yet, its trials failed for a misspelled metric, takes the corrected one)."""
        direction = study.direction.name.lower()
        if direction != self.direction:
            raise UserError(f"sweeper.direction={self.direction}: the study in {db} was created to {direction}, and its "
                            f"trials were told so ; resume with sweeper.direction={direction}, or start a new sweep")
        metric = study.user_attrs.get(METRIC)
        told = any(t.value is not None or t.intermediate_values for t in study.get_trials(deepcopy=False))
        if metric not in (None, self.metric) and told:
            raise UserError(f"sweeper.metric={self.metric}: the study in {db} ranks its trials by {metric} ; resume with "
                            f"sweeper.metric={metric}, or start a new sweep")
        if metric != self.metric:
            study.set_user_attr(METRIC, self.metric)

    def run(self, context: SweepContext) -> list[Outcome]:
        from optuna.trial import TrialState

        space, fixed = search_space(context.arguments)
        base = ovr.parse(fixed, context.groups, multirun=False)[0]
        # Every key of the space must exist in the config, and every choice be a value it takes (a misspelled
        # option would fail each trial that draws it): a point at each distribution's low end, one per other choice.
        low = {key: _text(_low(d)) for key, d in space.items()}
        for values in [low, *({**low, key: _text(c)} for key, d in space.items() for c in getattr(d, "choices", ())[1:])]:
            context.check([*base, *ovr.parse([f"{k}={v}" for k, v in values.items()], context.groups, multirun=False)[0]])
        url = f"sqlite:///{context.root / DB_FILE}"
        study = self._open(context.root, url)
        context.status.total = self.n_trials
        outcomes: dict[int, Outcome] = {}
        # Trials an earlier session left failed or interrupted are tried again with their values, once each.
        retried = set(study.user_attrs.get("retried", []))
        for trial in study.get_trials(deepcopy=False):
            if trial.state == TrialState.RUNNING and trial.number in context.kept:  # killed after the point, before the tell
                self._tell(study, trial.number, context.kept[trial.number])
                trial = study.get_trials(deepcopy=False)[trial.number]
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.number in context.kept:
                outcomes[trial.number] = context.kept[trial.number]
                outcomes[trial.number].label = " ".join(f"{key}={_text(value)}" for key, value in trial.params.items())
            # A WAITING trial is one an earlier session queued and did not ask yet: asked below, as it is.
            elif trial.state in (TrialState.RUNNING, TrialState.FAIL) and trial.number not in retried:
                if trial.state == TrialState.RUNNING:
                    study.tell(trial.number, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={CONTINUES: trial.number})
                retried.add(trial.number)
        study.set_user_attr("retried", sorted(retried))
        todo = self.n_trials - sum(1 for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
        at_once = min(self.n_jobs, context.launcher.parallel)
        if at_once < self.n_jobs:
            print(f"warning: sweeper.n_jobs={self.n_jobs}, but the launcher runs {at_once} point{'s' * (at_once != 1)} at "
                  f"a time: the search asks {at_once} trial{'s' * (at_once != 1)} at a time ; to run more, raise "
                  f"launcher.jobs (or the launcher's own limit)", file=sys.stderr, flush=True)
        jobs = getattr(context.launcher, "jobs", None)  # the local launcher's, which the user set to run several
        if isinstance(jobs, int) and self.n_jobs < jobs:
            print(f"note: launcher.jobs={jobs}, but sweeper.n_jobs={self.n_jobs}: the search asks {self.n_jobs} "
                  f"trial{'s' * (self.n_jobs != 1)} at a time, so {self.n_jobs} point{'s' * (self.n_jobs != 1)} "
                  f"run at once ; set sweeper.n_jobs={jobs} to use them all", file=sys.stderr, flush=True)
        while todo > 0:
            batch = [study.ask(space) for _ in range(min(at_once, todo))]
            plans = []
            for trial in batch:
                values = [f"{key}={_text(trial.params[key])}" for key in space]
                point = [*base, *ovr.parse(values, context.groups, multirun=False)[0]]
                _take_over(context, trial, [o.text for o in point])
                setting = {"storage": url, "study": self.study_name, "trial_id": trial._trial_id, "metric": self.metric, "pruner": self.pruner}
                plans.append(Plan(trial.number, " ".join(values), point, {TRIAL_ENV: json.dumps(setting)}))
            for plan, trial, outcome in zip(plans, batch, context.launch(plans)):
                outcomes[trial.number] = outcome
                self._tell(study, trial, outcome)
            todo -= len(batch)
            misnamed = next((o for o in outcomes.values() if self._misnamed(o)), None)
            if misnamed is not None and todo > 0:
                print(f"the search stops: trial {misnamed.number} logged no {self.metric} but a close name, as every trial "
                      f"would ; fix sweeper.metric and resume the sweep with it", file=sys.stderr, flush=True)
                break
        self._record_best(study)
        return [outcomes[n] for n in sorted(outcomes)]

    def _misnamed(self, outcome: Outcome) -> bool:
        """Whether a trial trained to its end but logged `metric` under a close name (a misspelled
        sweeper.metric): every trial would fail alike."""
        return outcome.status == "failed" and self.metric not in outcome.metrics and bool(misnamed_metric(self.metric, outcome.metrics))

    def _tell(self, study, trial, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        if outcome.status in ("pruned", "diverged"):  # diverged: these values are bad, not to be tried again
            study.tell(trial, state=TrialState.PRUNED)
        elif outcome.status == "ok":  # the point checked that it logged the metric (forgather.launch.point)
            study.tell(trial, outcome.metrics[self.metric])
        else:
            study.tell(trial, state=TrialState.FAIL)

    def _record_best(self, study) -> None:
        from optuna.trial import TrialState

        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            best = study.best_trial
            self.best = {"number": best.number, "value": best.value, "params": best.params}
            print(f"best trial: #{best.number} {self.metric}={best.value:.4g} " + " ".join(f"{k}={_text(v)}" for k, v in best.params.items()), flush=True)

    def summary(self) -> dict[str, Any]:
        return {"best": self.best, "metric": self.metric, "direction": self.direction} if self.best else {}


def _take_over(context: SweepContext, trial, overrides: list[str]) -> None:
    """A trial asked again for an interrupted one continues it: the interrupted trial's directory, if it holds a
    checkpoint of the same overrides, becomes the new trial's, and the values it reported up to that
    checkpoint are the new trial's too (the steps after it are trained, and reported, again)."""
    from forgather.run import latest_checkpoint, readable_step

    origin = trial.user_attrs.get(CONTINUES)
    if origin is None:
        return
    old, new = context.root / str(origin), context.root / str(trial.number)
    if new.exists() or not continues(old, overrides):
        return
    step = readable_step(latest_checkpoint(old))
    old.rename(new)
    if step is None:  # the point's resume names the checkpoint that does not read
        return
    for at, value in sorted(_reported(trial.study, origin).items()):
        if at <= step:
            trial.report(value, at)
    print(f"trial {trial.number} continues trial {origin} from its checkpoint at step {step}", flush=True)


def _reported(study, number: int) -> dict[int, float]:
    return next(t.intermediate_values for t in study.get_trials(deepcopy=False) if t.number == number)


def _low(distribution: Any) -> Any:
    return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
