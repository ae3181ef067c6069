"""`python -m forgather.run`: pick an experiment, apply overrides, train with Lightning, keep a snapshot.

    python -m forgather.run +experiment=tiny_llama lr=3e-4 optimizer=adafactor
    python -m forgather.run -m +experiment=tiny_llama lr=1e-3,3e-4 optimizer=adamw,adafactor
    python -m forgather.run --from-snapshot outputs/tiny_llama/2026-11-24_10-00-00     (rerun exactly)
    python -m forgather.run --resume outputs/tiny_llama/2026-11-24_10-00-00            (continue)
    python -m forgather.run --resume outputs/tiny_llama/2026-11-24_10-00-00 --checkpoint 600 lr=1e-4   (roll back)
    python -m forgather.run --resume multirun/2026-11-24_10-00-00      (a sweep: run the points not finished)
    python -m forgather.run +experiment=tiny_llama --cfg all --resolve    (print config and settings; --info: choices)

Flow of one run: `+experiment=NAME` names `configs/NAME.yaml` of the project (-p, default the current
directory when it holds a meta.yaml) or `experiment/NAME.yaml` on the search path. Group choices
(`optimizer=adafactor`) are template variables; the template must actually include `GROUP/OPTION.yaml`.
The rendered config goes through the graph to an OmegaConf config, value overrides are applied
(forgather.overrides), `output_dir` is set to the run directory, and the targets are constructed:
`trainer`, `module` and `datamodule`, after seeding with `seed`. A `Snapshot` callback records the run,
then `trainer.fit` runs. Final metrics land in `<run_dir>/metrics.yaml`.

Run directories: `outputs/<experiment>/<timestamp>/`, or `output_dir=DIR` (new or empty); sweeps
`multirun/<timestamp>/<n>/`, ending with a table of every point's final metrics (a failing point is
reported, the others still run). A sweep (`-m`) is run by forgather.launch: a launcher (`launcher=local`,
`submitit`, `ray`) runs each point as `python -m forgather.run OVERRIDES` with FORGATHER_SWEEP_POINT=DIR, a sweeper
(`sweeper=basic`, `optuna`) chooses the points; `--resume multirun/<timestamp>` runs the points that did not
finish. The run directory is fixed before Lightning starts other ranks
(FORGATHER_RUN_DIR), so every rank agrees on it. A run prints its directory and its model's export
directory when it starts and when it ends; staging left in its directory by killed writers is removed.

`--resume` continues from the newest checkpoint (a `last.ckpt` of the step fit ended at, see
forgather.lightning.model_checkpoint) in the run's own directory, appending to its metric history
(forgather.lightning.csv_logger). A run already at its max_steps is left unchanged, unless its export did
not complete: then only the export is redone.

`--resume RUN_DIR --checkpoint NAME_OR_STEP` (or `--resume RUN_DIR/checkpoints/NAME.ckpt`) rolls the run back:
it continues from that checkpoint instead of the newest. Nothing is deleted: the checkpoints that rank newer
(a later step, or one that does not read placed after it) are moved into `checkpoints/abandoned-<time>/`, with
a copy of `csv/metrics.csv` as it was, so that a later `--resume` does not take them and they can be moved back.
The metric history then goes on as every resume's does: the CSV rows from the checkpoint's step on are
replaced by the new ones; TensorBoard's event files only grow, so its plots show both branches past that step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from forgather import overrides as ovr
from forgather import run_lock
from forgather.errors import STRICT_ENV, MachineError, UserError, did_you_mean, report
from forgather.launch.point import SWEEP_POINT_ENV
from forgather.project import META_FILE, LoadedConfig, Project, conf_dir, from_project_snapshot, tracking_from_project
from forgather.template import TemplateEnvironment
from forgather.yaml_file import read_recorded

RUN_DIR_ENV = "FORGATHER_RUN_DIR"
# Directories on the search path that hold templates, not options to choose with group=option.
TEMPLATE_DIRS = ("base", "configs")
METRICS_FILE = "metrics.yaml"
CHECKPOINTS_DIR = "checkpoints"
ABANDONED_PREFIX = "abandoned-"  # checkpoints/abandoned-<time>/: a rollback's newer checkpoints, kept


# What `--cfg` prints, as Hydra names them: the job's config, the runner's own settings, or both.
CFG_PARTS = ("job", "hydra", "all")


class _CfgPart(argparse.Action):
    """`--cfg [job|hydra|all]`, Hydra's flag. A bare `--cfg` means `job`; when argparse hands it the next
    word and that is not a part (`--cfg lr=1e-3`, as earlier releases took it), the word is an override."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value is None or value in CFG_PARTS:
            namespace.cfg = value or "job"
        elif "=" not in value and not value.startswith("~"):  # no override either: a misspelled part
            hint = did_you_mean(value, CFG_PARTS)
            parser.error(f"--cfg takes {', '.join(CFG_PARTS)} (or nothing: job), not {value!r}" + (f"; {hint}" if hint else ""))
        else:
            namespace.cfg = "job"
            namespace.overrides = [*(getattr(namespace, "overrides", None) or []), value]


# The runner's options as (flags, add_argument keywords): one table serves this parser, `forgather train`
# (which takes -p and --template-path as options of `forgather` itself) and `run_argv`, which turns parsed
# options back into this command line.
PROJECT_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("-p", "--project"), dict(help="project directory (default: the current directory if it has a meta.yaml)")),
    (("--template-path",), dict(action="append", default=[], metavar="DIR", help="extra template directory")),
    (("--dynamic-args",), dict(type=json.loads, default={}, metavar="JSON", help="values of the config's declared arguments (dynamic_args), as `forgather train` passes them")),
)
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("-m", "--multirun"), dict(action="store_true", help="sweep: run every combination of comma lists, range(), choice(), glob()")),
    (("--cfg",), dict(action=_CfgPart, nargs="?", metavar="{job,hydra,all}", help="print the config as it would run (job), the runner's settings (hydra) or both (all), and exit")),
    (("--resolve",), dict(action="store_true", help="with --cfg: resolve ${...} interpolations in what is printed")),
    (("--info",), dict(action="store_true", help="show the option of each group the experiment uses, every group's options, and exit")),
    (("--dry-run",), dict(action="store_true", help="print the launch command, and exit")),
    (("--strict",), dict(action="store_true", help="warnings about likely mistakes (a block no template extends, a repeated YAML key) are errors (FORGATHER_STRICT=1)")),
    (("-d", "--devices"), dict(help="GPU indices to train on, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")),
    (("--outputs",), dict(default=".", help="where outputs/ and multirun/ go (default: the current directory; for forgather train, the project)")),
    (("--checkpoint",), dict(metavar="NAME_OR_STEP", help="with --resume: roll back, continuing from this checkpoint (a file name in RUN_DIR/checkpoints/, or a step) instead of the newest; the newer ones are moved, kept, to checkpoints/abandoned-<time>/")),
)
# Mutually exclusive: where the config comes from when not from the templates.
SOURCE_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--from-snapshot",), dict(metavar="RUN_DIR", help="rerun the config recorded in RUN_DIR's snapshot")),
    (("--resume",), dict(metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint (or from RUN_DIR/checkpoints/NAME.ckpt given instead, as --checkpoint does); keep_checkpoints=N lowered here removes the oldest step checkpoints beyond N at once")),
    (("--auto-resume",), dict(action="store_true", help="with output_dir=DIR: continue the run in DIR if it has a checkpoint, else start it there (job scripts a scheduler may run again)")),
)


def add_arguments(parser: argparse.ArgumentParser, project_options: bool = True) -> None:
    """The runner's arguments on `parser` (without -p/--template-path when `project_options` is false)."""
    parser.add_argument("overrides", nargs="*", action="extend", default=[], help="+experiment=NAME, group=option, key=value, +key=value, ++key=value, ~key")
    for flags, options in (*PROJECT_OPTIONS, *OPTIONS) if project_options else OPTIONS:
        parser.add_argument(*flags, **options)
    source = parser.add_mutually_exclusive_group()
    for flags, options in SOURCE_OPTIONS:
        source.add_argument(*flags, **options)


def run_argv(args: argparse.Namespace) -> list[str]:
    """The options of `args` that differ from their defaults, as a command line of this runner (overrides
    and -p/--template-path not included)."""
    argv: list[str] = []
    for flags, options in (*OPTIONS, *SOURCE_OPTIONS):
        value = getattr(args, flags[-1].lstrip("-").replace("-", "_"), None)
        if value is None or value is False or value == options.get("default"):
            continue
        argv += [flags[0]] if value is True else [flags[0], str(value)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    from forgather.errors import HintingParser

    parser = HintingParser(prog="python -m forgather.run", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


@contextlib.contextmanager
def _run_dir_env(run_dir: Path):
    """Publish the run directory to the ranks Lightning launches from this process, for this run only."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def checkpoints_newest_first(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in `directory`, newest first: `*.ckpt` files, and directories of shards (the pipeline
    strategy's hold a meta.pt). Written atomically, every one found is whole.

    Newest is the highest global step a checkpoint records, the latest modified first among equals (last.ckpt and
    the step checkpoint of its step): modification times alone are lost by a copy that does not keep them (`cp -r`,
    `rsync -r`, a restore from a backup dates the files in copy order), and a resume would go back to whichever was
    copied last. One that does not read has no step: it ranks where its modification time puts it among those that
    read, so a last.ckpt cut short is still the one a resume names (resume_step says which reads instead)."""
    found = [p for p in Path(directory).glob("*.ckpt") if p.is_file() or (p / "meta.pt").is_file()]
    modified = {p: p.stat().st_mtime_ns for p in found}
    steps = {p: readable_step(p) for p in found}

    def rank(path: Path) -> tuple[int, int]:
        step = steps[path]
        if step is None:
            step = max((s for other, s in steps.items() if s is not None and modified[other] <= modified[path]), default=-1)
        return step, modified[path]

    return sorted(found, key=rank, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run: a run killed between writing a step checkpoint and updating last.ckpt
    resumes from the step checkpoint."""
    return next(iter(checkpoints_newest_first(run_dir / CHECKPOINTS_DIR)), None)


def resume_arguments(resume: str, checkpoint: str | None) -> tuple[str, str | None]:
    """(run directory, checkpoint) of `--resume X [--checkpoint C]`: X may name a checkpoint of a run itself
    (RUN_DIR/checkpoints/NAME.ckpt), which is then the one to continue from."""
    path = Path(resume)
    if path.suffix != ".ckpt":
        return resume, checkpoint
    if checkpoint is not None:
        raise UserError(f"--resume {resume} names a checkpoint and --checkpoint {checkpoint} another: give one "
                        f"(--resume RUN_DIR --checkpoint NAME_OR_STEP)")
    if path.parent.name != CHECKPOINTS_DIR:
        raise UserError(f"--resume {resume}: not a checkpoint in a run's {CHECKPOINTS_DIR}/; give the run: "
                        f"--resume RUN_DIR --checkpoint NAME_OR_STEP")
    return str(path.parent.parent), path.name


def chosen_checkpoint(run_dir: Path, wanted: str) -> Path:
    """The checkpoint `--checkpoint wanted` names in the run's checkpoints/: a file name (`.ckpt` may be left
    out), or a step (the newest checkpoint of that step, by checkpoints_newest_first's rule)."""
    directory = run_dir / CHECKPOINTS_DIR
    found = checkpoints_newest_first(directory) if directory.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{directory} holds no checkpoint: nothing to resume (use --from-snapshot to start over)")
    by_name = {path.name: path for path in found}
    name = Path(wanted).name
    if name != wanted and Path(wanted).resolve().parent != directory.resolve():
        raise UserError(f"--checkpoint {wanted}: not in {directory}; a resume continues from one of the run's own checkpoints")
    if name in by_name or f"{name}.ckpt" in by_name:
        return by_name.get(name) or by_name[f"{name}.ckpt"]
    steps = {path: readable_step(path) for path in found}
    available = steps_list(sorted({step for step in steps.values() if step is not None}))
    if wanted.isdigit():
        at_step = [path for path in found if steps[path] == int(wanted)]
        if at_step:
            return at_step[0]
        raise UserError(f"--checkpoint {wanted}: {run_dir} has no checkpoint at step {wanted}; its checkpoints are at "
                        f"steps {available}")
    hint = did_you_mean(name, by_name)
    raise UserError(f"--checkpoint {wanted}: no such checkpoint in {directory}" + (f"; {hint}" if hint else "")
                    + f" ; give a file name there or a step: {available}")


def steps_list(steps: list[int], most: int = 12) -> str:
    """`4, 8, 12`; a long list with its middle left out (the first three and the last ones)."""
    shown = [str(s) for s in steps] if len(steps) <= most else [*map(str, steps[:3]), "...", *map(str, steps[3 - most:])]
    return ", ".join(shown) or "none that reads"


def newer_than(run_dir: Path, ckpt_path: Path) -> list[Path]:
    """The checkpoints a later `--resume` would take before `ckpt_path` (checkpoints_newest_first), less those of
    its own step (the same state: last.ckpt saved with the step checkpoint of its step)."""
    found = checkpoints_newest_first(run_dir / CHECKPOINTS_DIR)
    step = readable_step(ckpt_path)
    ahead = found[:found.index(ckpt_path)] if ckpt_path in found else []
    return [path for path in ahead if step is None or readable_step(path) != step]


def set_aside(run_dir: Path, checkpoints: list[Path]) -> Path | None:
    """Move `checkpoints` (a rollback's newer ones) into a new checkpoints/abandoned-<time>/ of the run, with a copy
    of the metric history as it was; nothing is deleted. Says in one line what went where; returns the directory."""
    import shutil

    if not checkpoints:
        return None
    aside = _fresh_dir(run_dir / CHECKPOINTS_DIR / f"{ABANDONED_PREFIX}{_timestamp()}")
    for path in checkpoints:
        os.replace(path, aside / path.name)  # the same file system: a rename, nothing copied
    history = run_dir / "csv" / "metrics.csv"
    if history.is_file():
        shutil.copy2(history, aside / history.name)
    steps = sorted(s for p in checkpoints if (s := readable_step(aside / p.name)) is not None)
    span = f", steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f", step {steps[0]}" if steps else ""
    kept = f" and a copy of {history.relative_to(run_dir)}" if history.is_file() else ""
    print(f"rolling back: moved {len(checkpoints)} newer checkpoint{'s' * (len(checkpoints) > 1)} "
          f"({', '.join(p.name for p in checkpoints)}{span}){kept} to {aside}; a later --resume does not take them, "
          f"move them back to return to them", flush=True)
    return aside


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _fresh_dir(base: Path) -> Path:
    """`base`, or `base-1`, `base-2` ... if taken (two runs started in the same second)."""
    candidate, number = base, 0
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate.resolve()
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")
        except (FileNotFoundError, NotADirectoryError) as error:  # a path under /proc, a parent that is a file
            raise UserError(f"{candidate}: cannot create the run's directory ({error.strerror}); choose where runs "
                            f"go with --outputs DIR (or output_dir=DIR)") from None


@dataclass
class Runner:
    args: argparse.Namespace
    command: list[str]
    project: Project
    search_path: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def create(cls, args: argparse.Namespace, command: list[str]) -> "Runner":
        root = Path(args.project or ".").resolve()
        if args.project and not (root / META_FILE).is_file():
            raise FileNotFoundError(f"{root} is not a Forgather project: it has no {META_FILE}")
        project = Project.load(str(root)) if (root / META_FILE).is_file() else Project(str(root), {})
        search_path = project.search_path(tuple(args.template_path))
        groups = ovr.find_groups(search_path)
        groups.setdefault("experiment", [])
        groups["experiment"] = sorted(set(groups["experiment"]) | {Path(c).with_suffix("").as_posix() for c in project.configs()})
        return cls(args, command, project, search_path, groups)

    # -- one config ---------------------------------------------------------------------------------------

    def experiment_template(self, name: str) -> str:
        if f"{name}.yaml" in self.project.configs():
            return self.project.config_template(name)
        return f"experiment/{name}.yaml"

    def load(self, choices: dict[str, str]) -> tuple[str, LoadedConfig]:
        experiment = choices.pop("experiment", None) or self.project.meta.get("default_config", "").removesuffix(".yaml")
        if not experiment:
            options = ", ".join(self.groups["experiment"]) or "none found"
            raise ovr.OverrideError(f"choose an experiment: +experiment=NAME (options: {options})")
        context: dict[str, Any] = {**self.args.dynamic_args, **choices}
        if self.args.devices:
            context.update(accelerator="gpu", devices=len(self.args.devices.split(",")))
        loaded = LoadedConfig(self.project, self.experiment_template(experiment), TemplateEnvironment(self.search_path), context)
        loaded.graph  # render now, so that the group check below sees what was included
        used = loaded.templates.loaded_templates()
        for group, option in choices.items():
            if f"{group}/{option}.yaml" not in used:
                raise ovr.OverrideError(f"{group}={option}: experiment {experiment!r} does not use group {group!r}")
        return experiment, loaded

    def sources(self, loaded: LoadedConfig) -> dict[str, str]:
        """Files for the snapshot: every template used (named by search-path root) and the model source."""
        labels = {self.project.templates_dir: "project", conf_dir(): "conf"}
        found: dict[str, str] = {}
        for path in loaded.templates.source_files():
            for root in self.search_path:
                if path.startswith(os.path.join(root, "")):
                    label = labels.get(root, f"path{self.search_path.index(root)}")
                    found[f"templates/{label}/{os.path.relpath(path, root)}"] = path
                    break
        if os.path.isdir(self.project.model_src):
            found["model_src"] = self.project.model_src
        return found

    def choices(self, loaded: LoadedConfig) -> dict[str, str]:
        """The option of each group the rendered config used: `GROUP/OPTION.yaml` among the loaded templates,
        less the options another option of the same group includes by name (model/tiny.yaml includes
        model/llama.yaml: the choice is tiny). Several left (a template that names both) are comma-joined."""
        used: dict[str, set[str]] = {}
        for name in loaded.templates.loaded_templates():
            group, _, option = name.rpartition("/")
            if group in self.groups and group not in (*TEMPLATE_DIRS, "experiment") and option.removesuffix(".yaml") in self.groups[group]:
                used.setdefault(group, set()).add(name)
        chosen = {}
        for group, names in sorted(used.items()):
            included = set()
            for name in names:
                included |= set(loaded.templates.references(name)) - {name}
            options = sorted((names - included) or names)
            chosen[group] = ",".join(PurePosixPath(n).stem for n in options)
        return chosen

    def settings(self, experiment: str, loaded: LoadedConfig, point: list[ovr.Override]) -> dict[str, Any]:
        """What `--cfg hydra` prints: the runner's side of a run, under the names Hydra gives them."""
        outputs = Path(self.args.outputs).resolve()
        return {
            "mode": "MULTIRUN" if self.args.multirun else "RUN",
            "searchpath": list(self.search_path),
            "overrides": {"task": [o.text for o in point]},
            "runtime": {"experiment": experiment, "template": loaded.template, "project": self.project.root, "choices": self.choices(loaded)},
            "run": {"dir": str(outputs / "outputs" / experiment / "${now:%Y-%m-%d_%H-%M-%S}")},
            "sweep": {"dir": str(outputs / "multirun" / "${now:%Y-%m-%d_%H-%M-%S}"), "subdir": "${job.num}"},
        }

    # -- runs -----------------------------------------------------------------------------------------

    def run_dir(self, experiment: str, values: list[ovr.Override]) -> Path:
        if os.environ.get(RUN_DIR_ENV):
            return Path(os.environ[RUN_DIR_ENV])
        if getattr(self.args, "restart_in", None):  # --auto-resume of a run stopped before its first checkpoint
            return self.args.restart_in
        requested = requested_run_dir(values)
        if requested is None:
            warn_if_requeued()
        return requested or _fresh_dir(Path(self.args.outputs) / "outputs" / experiment / _timestamp())

    def run_point(self, point: list[ovr.Override], run_dir: Path | None = None, callbacks: list | None = None) -> dict[str, float] | None:
        sweeping = run_dir is not None
        experiment, loaded, config, values = self.job(point)
        warn_about_warmup(config)
        self.warn_about_unread_additions(config, values)
        if self.args.cfg:
            print_config(self.args, config, lambda: self.settings(experiment, loaded, point))
            return None
        check_accelerator(config)
        run_dir = run_dir or self.run_dir(experiment, values)
        config.output_dir = str(run_dir)
        export = export_settings(self.args.outputs, experiment, self.project.model_src, run_dir if sweeping else None)
        meta = {
            "experiment": experiment,
            "template": loaded.template,
            "project_dir": self.project.root,
            "model_src": self.project.model_src,
            "export_dir": str(export["out_dir"]),
        }
        model_code = loaded.code("model", config) if "model" in config else None
        snapshot = {
            "overrides": [o.text for o in point],
            "sources": self.sources(loaded),
            "meta": meta,
            "model_code": model_code,
            "command": self.command,
        }

        def construct() -> dict[str, Any]:
            with tracking_from_project() as records:  # other projects' configs this one builds from
                built = loaded.construct(config=config)
            if records:
                meta["from_project"], files = from_project_snapshot(records)
                snapshot["sources"].update(files)
            return built

        # A sweep point's directory that holds a checkpoint is one a resumed sweep continues (launch.sweep.continues)
        ckpt_path = latest_checkpoint(run_dir) if sweeping else None
        if ckpt_path is not None:
            _say_resuming(run_dir, ckpt_path, resume_step(run_dir, ckpt_path))
        with _run_dir_env(run_dir), ovr.naming_overrides(config, values):
            return train(config, run_dir, construct=construct, snapshot=snapshot, export=export, callbacks=callbacks,
                         ckpt_path=str(ckpt_path) if ckpt_path else None)

    def job(self, point: list[ovr.Override]) -> tuple[str, LoadedConfig, DictConfig, list[ovr.Override]]:
        """The experiment, the loaded config, the config with `point`'s values applied (as a run gets it), and
        those values (`point` less its group choices)."""
        choices, values = ovr.split_choices(point, self.groups)
        experiment, loaded = self.load(choices)
        config = self._job_config(loaded)
        ovr.apply(config, values, self.declared_by)
        return experiment, loaded, config, values

    def warn_about_unread_additions(self, config: DictConfig, values: list[ovr.Override]) -> None:
        """Warn about each `+key=v` that adds a top-level key nothing reads (a value that changes nothing), naming
        the group options that declare it."""
        for override in ovr.unread_additions(config, values, runner_keys=("output_dir",)):
            options = self.declared_by(override.key)
            where = (f"; {ovr.config_value_of(override.key, options)}: choose that option" if options
                     else "; check its spelling, or set a component's argument (+trainer.NAME=...)")
            print(f"warning: {override.text} adds a top-level key that nothing in this config reads{where}",
                  file=sys.stderr)

    def declared_by(self, key: str) -> list[str]:
        """The group options that declare the config value `key` (for the error of a key this config lacks)."""
        return ovr.declared_by_options(key, self.search_path, self.groups)

    @staticmethod
    def _job_config(loaded: LoadedConfig) -> DictConfig:
        """The config a point runs: the rendered one less the runner's own `hydra:` settings (launcher, sweeper)."""
        from forgather.launch.settings import TEMPLATE_KEY

        config = loaded.config.copy()
        config.pop(TEMPLATE_KEY, None)
        return config

    # -- sweeps (forgather.launch runs them; the runner renders and checks) ----------------------------------

    def sweep(self, arguments: list[str], root: Path | None = None) -> int:
        """Run a sweep (`-m`) of the overrides `arguments` in a new multirun directory, or resume the one at
        `root`: the launcher and sweeper come from the runner overrides among `arguments` and the template."""
        from forgather.launch import sweep as launch_sweep

        settings, runner_arguments, job_arguments = self._sweep_settings(arguments)
        if any(a.lstrip("+").startswith("output_dir=") for a in job_arguments):
            raise ovr.OverrideError("output_dir with -m: each point of a sweep runs in multirun/<time>/<n>/; choose where multirun/ goes with --outputs DIR")
        launcher, sweeper = settings.build("launcher"), settings.build("sweeper")
        resume = root is not None
        if root is None:
            warn_if_requeued(sweep=True)
            root = _fresh_dir(Path(self.args.outputs) / "multirun" / _timestamp())
            launch_sweep.write_record(root, {**self.sweep_record(), "overrides": job_arguments[len(settings.params):], "runner": runner_arguments})
        rendered: dict[tuple, LoadedConfig] = {}
        warned: set[str] = set()

        def check(point: list[ovr.Override]) -> None:
            choices, values = ovr.split_choices(point, self.groups)
            key = tuple(sorted(choices.items()))
            if key not in rendered:
                rendered[key] = self.load(dict(choices))[1]
            config = self._job_config(rendered[key])
            ovr.apply(config, values, self.declared_by)
            # Said here, once, where the sweep's user sees it: each point says it only in its output.log.
            self.warn_about_unread_additions(config, [o for o in values if o.key not in warned])
            warned.update(o.key for o in values)

        try:
            command = self.point_command(getattr(launcher, "gpus_per_job", 0))
            outcomes = launch_sweep.run(root, launcher, sweeper, job_arguments, self.groups, check, command, resume)
        except BaseException:  # launch.sweep.run says how to continue a sweep that was interrupted
            if not resume and not any(p.is_dir() for p in root.iterdir()):  # refused before any point started
                import shutil

                shutil.rmtree(root)
                with contextlib.suppress(OSError):  # multirun/ itself, when this sweep was its first
                    root.parent.rmdir()
            raise
        _print_sweep(root, outcomes)
        return 1 if any(o.status == "failed" for o in outcomes) else 0

    def _sweep_settings(self, arguments: list[str]) -> tuple[Any, list[str], list[str]]:
        """(launcher and sweeper settings, the runner overrides, the job's overrides with the template's
        sweep params first) of a sweep's command line."""
        from forgather.launch import settings as launch_settings

        runner_arguments = [a for a in arguments if launch_settings.is_runner_override(a)]
        job_arguments = [a for a in arguments if not launch_settings.is_runner_override(a)]
        settings = launch_settings.resolve(self.search_path, runner_arguments, self._template_settings(job_arguments))
        return settings, runner_arguments, [*settings.params, *job_arguments]

    def sweep_points(self, arguments: list[str]) -> list[list[ovr.Override]]:
        """The points a sweep would run (for `--cfg -m`): the basic sweeper's plan, paired axes zipped."""
        settings, _, job_arguments = self._sweep_settings(arguments)
        sweeper = settings.build("sweeper")
        if not hasattr(sweeper, "plan"):
            raise ovr.OverrideError("--cfg with a searching sweeper: its points are chosen as the search runs; print one point with --cfg and single values")
        return [plan.point for plan in sweeper.plan(job_arguments, self.groups)]

    def _template_settings(self, arguments: list[str]) -> Any:
        """The experiment's `hydra:` mapping, rendered with the overrides that are not swept."""
        from forgather.launch.settings import TEMPLATE_KEY

        fixed = [item.input_line for item in ovr.parse_hydra(arguments) if not item.is_sweep_override()]
        choices, _ = ovr.split_choices(ovr.parse(fixed, self.groups, multirun=False)[0], self.groups)
        return self.load(choices)[1].config.get(TEMPLATE_KEY)

    def sweep_record(self) -> dict[str, Any]:
        """Where the sweep's points come from, in absolute paths, for `--resume MULTIRUN_DIR`."""
        project = self.project.root if (Path(self.project.root) / META_FILE).is_file() else None
        return {
            "project": project,
            "template_path": [str(Path(p).resolve()) for p in self.args.template_path],
            "outputs": str(Path(self.args.outputs).resolve()),
            "devices": self.args.devices,
        }

    def point_command(self, gpus_per_point: int = 0) -> list[str]:
        """The command that runs one point, before its overrides (its directory goes in FORGATHER_SWEEP_POINT).
        `-d` tells the point's template to train on GPUs: the sweep's own `-d`, or as many as the launcher
        gives each point (it makes them visible itself, as devices 0..N-1)."""
        record = self.sweep_record()
        command = [sys.executable, "-m", "forgather.run", "--outputs", record["outputs"]]
        devices = ",".join(map(str, range(gpus_per_point))) if gpus_per_point else record["devices"]
        if devices:
            command += ["-d", devices]
        if record["project"]:
            command += ["-p", record["project"]]
        for path in record["template_path"]:
            command += ["--template-path", path]
        return command


def check_accelerator(config: DictConfig) -> None:
    """A trainer set to train on a CUDA GPU (trainer=gpu, or -d) on a machine where torch sees none: one line that
    names the setting and what to do, before anything is built. (Lightning's own "No supported gpu backend
    found!" comes after the model and data are built, and says neither.)"""
    try:
        accelerator = OmegaConf.select(config, "trainer.accelerator", default=None, throw_on_missing=False)
    except Exception:  # an interpolation that does not resolve: construction will say so
        return
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    raise MachineError(f"trainer.accelerator={accelerator!r} (trainer=gpu, or -d): this machine has no CUDA GPU that "
                       f"torch {torch.__version__} can use ; train on the CPU (leave trainer=gpu and -d out), or "
                       f"install a CUDA build of torch")


def warn_about_warmup(config: DictConfig) -> None:
    """Warn when a warmup setting (a key named `*warmup*` holding a step count) exceeds the run's max_steps:
    the learning rate would never reach its peak. Easy to miss in a sweep over max_steps."""
    try:
        data = OmegaConf.to_container(config, resolve=True)
    except Exception:  # a value still missing (???): construction will say so
        return
    trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
    max_steps = next((v for v in (trainer.get("max_steps"), data.get("max_steps")) if type(v) is int and v > 0), None)
    if max_steps is None:
        return
    found, stack = [], [("", data)]
    while stack:
        prefix, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            path = f"{prefix}{key}"
            if "warmup" in str(key) and type(value) is int and value > max_steps:
                found.append(path)
            stack.append((path + ".", value))
    if found:
        path = min(found, key=lambda p: (p.count("."), p))
        value = OmegaConf.select(config, path)
        print(
            f"warning: {path}={value} exceeds max_steps={max_steps}: the learning rate never reaches its peak ; "
            f"lower {path} or raise max_steps",
            file=sys.stderr,
            flush=True,
        )


def warn_if_requeued(sweep: bool = False) -> None:
    """A SLURM job run again (requeued after a preemption, a node failure or `scontrol requeue`) that starts a
    run in a new directory trains from step 0, where --auto-resume would continue the run it started (and
    --resume the sweep)."""
    if _requeued():
        restarts = os.environ["SLURM_RESTART_COUNT"]
        what, starts, how = (("sweep", "a new sweep", "resume it with --resume multirun/<time>") if sweep else
                             ("run", "a new run from step 0", "give its command --auto-resume and output_dir=runs/$SLURM_JOB_ID"))
        print(f"warning: this SLURM job runs again (SLURM_RESTART_COUNT={restarts}) and starts {starts}; "
              f"to continue the {what} it started instead, {how}", flush=True)


def _requeued() -> bool:
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    return restarts.isdigit() and int(restarts) > 0


def requested_run_dir(values: list[ovr.Override], create: bool = True) -> Path | None:
    """`output_dir=DIR` on the command line: the run goes to DIR (created, unless not `create`), which must be
    new or empty."""
    for override in values:
        if override.key != "output_dir":
            continue
        if override.kind == "delete":
            raise ovr.OverrideError("~output_dir: a run needs a directory; leave output_dir out to get outputs/<experiment>/<time>")
        path = Path(str(override.value)).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ovr.OverrideError(f"{override.text}: {path} is a file; give a new or empty directory")
        if path.is_dir() and any(path.iterdir()):
            hint = f"`--resume {path}` continues that run" if (path / "snapshot").is_dir() else "give a new or empty directory"
            if (path / "snapshot").is_dir() and _requeued():
                hint += "; in a job script a scheduler may run again, --auto-resume does it every time"
            raise ovr.OverrideError(f"{override.text}: {path} is not empty ({hint})")
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    return None


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint (a file, or a sharded directory's meta.pt) was saved at; tensors are
    memory-mapped, not read. Each version of a file is read once: a resume asks for the same checkpoints' steps
    several times (to rank them, to name the one chosen, to set a rollback's newer ones aside)."""
    file = Path(path) / "meta.pt" if Path(path).is_dir() else Path(path)
    stat = file.stat()
    return _saved_step(str(file), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _saved_step(file: str, inode: int, size: int, mtime_ns: int) -> int:  # (the file's identity: the cache key)
    import torch

    state = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    return int(state["global_step"])


def readable_step(path: Path) -> int | None:
    try:
        return checkpoint_step(path)
    except Exception:
        return None


def resume_step(run_dir: Path, ckpt_path: Path) -> int:
    """The step of the checkpoint --resume continues from; one that cannot be read (a copy cut short, a file
    written over) is an error naming it and the newest checkpoint beside it that can be read."""
    try:
        return checkpoint_step(ckpt_path)
    except Exception as error:  # torch says it in its own words: a zip's missing directory, an unpickling error
        readable = _newest_readable(run_dir, besides=ckpt_path)
        hint = (f"move it out of {ckpt_path.parent} to resume from {readable[0].name} (step {readable[1]}), the "
                f"newest one that reads" if readable else
                f"no other checkpoint of this run reads: start over with --from-snapshot {run_dir}")
        raise _unreadable(ckpt_path, hint) from error


def _newest_readable(run_dir: Path, besides: Path) -> tuple[Path, int] | None:
    """(the newest checkpoint of the run other than `besides` that reads, its step), or None."""
    others = [p for p in checkpoints_newest_first(run_dir / CHECKPOINTS_DIR) if p != besides]
    return next(((p, step) for p in others if (step := readable_step(p)) is not None), None)


def _unreadable(ckpt_path: Path, hint: str) -> UserError:
    size = f"{ckpt_path.stat().st_size} bytes, " if ckpt_path.is_file() else ""
    return UserError(f"{ckpt_path}: not a readable checkpoint ({size}truncated or corrupt); {hint}")


def export_settings(outputs: str, experiment: str, base_dir: str | None, sweep_point: Path | None = None) -> dict[str, Any]:
    """Where a run's trained model goes: `<outputs>/output_models/<experiment>`; a sweep point's stays in its
    own run directory (`<point>/model`), so the points do not overwrite each other."""
    name = experiment.replace("/", "_")
    out_dir = sweep_point / "model" if sweep_point else Path(outputs).resolve() / "output_models" / name
    return {"out_dir": out_dir, "name": name, "base_dir": base_dir}



_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _checkpoint_mismatch(error: BaseException) -> str | None:
    """torch's load_state_dict failure (a wall of lines, one a parameter) as one clause: the first difference
    and how many more; None for any other error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "Error(s) in loading state_dict" not in text:
        return None
    sizes = _SIZE_MISMATCH.findall(text)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)\.\s*$", text, re.MULTILINE)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$", text, re.MULTILINE)
    parts = []
    if sizes:
        name, theirs, mine = sizes[0]
        more = f" (and {len(sizes) - 1} more parameters differ in shape)" if len(sizes) > 1 else ""
        parts.append(f"{name} is {theirs} in the checkpoint and {mine} here{more}")
    for found, what in ((missing, "this model has parameters the checkpoint lacks"),
                        (unexpected, "the checkpoint has parameters this model lacks")):
        if found:
            names = [n.strip().strip('"') for n in found.group(1).split(",")]
            parts.append(f"{what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    return "; ".join(parts) or text.splitlines()[0]


def _model_changes(config: DictConfig, run_dir: Path) -> str:
    """The settings of the config's `model` that differ from those the run started with (its snapshot's resolved
    config), as one clause naming the first three ("" when none is found or either side cannot be read): what
    made a resumed model's parameters differ from its checkpoint's, an override or an edited template."""
    try:
        recorded = OmegaConf.load(run_dir / "snapshot" / "config_resolved.yaml")
        then = OmegaConf.to_container(recorded.model) if OmegaConf.is_dict(recorded) and "model" in recorded else None
        now = OmegaConf.to_container(config.model, resolve=True) if "model" in config else None
    except Exception:  # noqa: BLE001 (a clause of an error message: missing records leave it out)
        return ""
    if then is None or now is None:
        return ""

    def leaves(node: Any, path: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {key: value for name, child in node.items() for key, value in leaves(child, f"{path}.{name}").items()}
        if isinstance(node, list):
            return {key: value for index, child in enumerate(node) for key, value in leaves(child, f"{path}.{index}").items()}
        return {path: node}

    before, after = leaves(then, "model"), leaves(now, "model")
    changed = [f"{key} was {before.get(key, 'unset')}, is {after.get(key, 'unset')}"
               for key in sorted(before.keys() | after.keys()) if before.get(key, _UNSET) != after.get(key, _UNSET)]
    if not changed:
        return ""
    return ", ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")


_UNSET = object()


def train(
    config: DictConfig,
    run_dir: Path,
    construct,
    snapshot: dict[str, Any],
    export: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    callbacks: list | None = None,
) -> dict[str, float]:
    """Seed, construct trainer/module/datamodule, attach the snapshot (and model export) and `callbacks`,
    fit; returns the final metrics. Prints where the run directory and the exported model are, before and after fitting.
    The run directory is locked meanwhile (forgather.run_lock): a second process that would train in it fails."""
    import pytorch_lightning as pl

    from forgather.lightning.quiet import quiet_lightning

    quiet_lightning()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock.hold(run_dir):
        if "seed" in config:
            pl.seed_everything(int(config.seed), workers=True, verbose=False)
        try:
            built = construct()
        except BaseException:
            if {p.name for p in run_dir.iterdir()} <= {run_lock.LOCK_FILE}:  # a failed construction leaves no run behind
                (run_dir / run_lock.LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
        return _fit(config, run_dir, built, snapshot, export, ckpt_path, callbacks)


def _fit(config: DictConfig, run_dir: Path, built: dict[str, Any], snapshot: dict[str, Any],
         export: dict[str, Any] | None, ckpt_path: str | None, callbacks: list | None) -> dict[str, float]:
    from forgather.callbacks.model_export import ExportModel
    from forgather.callbacks.snapshot import Snapshot
    from forgather.lightning.checkpoint_io import remove_staging
    from forgather.lightning.process_group import destroy_gloo_group_at_exit

    missing = [name for name in ("trainer", "module", "datamodule") if name not in built]
    if missing:
        raise ValueError(f"the config has no target {', '.join(missing)}: a training experiment defines trainer, module and datamodule")
    trainer = built["trainer"]
    exporting = export is not None and "model" in config
    if trainer.is_global_zero:
        # Staging left by writers killed in an earlier process (checkpoints, logs, snapshot, metrics).
        for directory in (run_dir, *(p for p in run_dir.iterdir() if p.is_dir())):
            remove_staging(directory)
        _print_where(run_dir, export["out_dir"] if exporting else None, _export_when(export["out_dir"], run_dir) if exporting else "")
    trainer.callbacks.append(Snapshot(run_dir, config=config, **snapshot))
    if exporting:
        trainer.callbacks.append(ExportModel(model_config=config.model, run_dir=run_dir, **export))
    trainer.callbacks.extend(callbacks or [])
    destroy_gloo_group_at_exit()  # Lightning's DDP and FSDP on CPU use gloo too
    try:
        with warnings.catch_warnings():
            if ckpt_path is not None:  # a resumed run's checkpoint directory holds its own checkpoints
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(built["module"], datamodule=built["datamodule"], ckpt_path=ckpt_path)
    except BaseException as error:
        if trainer.is_global_zero:
            # --resume needs a checkpoint: before the first one, say how to start over instead
            hint = ("--resume continues it" if latest_checkpoint(run_dir) is not None else
                    f"no checkpoint yet; start over with --from-snapshot {run_dir}")
            print(f"run directory: {run_dir} ({hint})", flush=True)
        mismatch = _checkpoint_mismatch(error) if ckpt_path is not None else None
        if mismatch is not None:
            from forgather.errors import UserError

            changes = _model_changes(config, run_dir)
            if changes:
                mismatch += f"; since the run started, {changes}"
            raise UserError(f"{ckpt_path}: the checkpoint does not fit this config's model: {mismatch} ; to go on "
                            f"with this run, resume without changing its model; to train the changed model, start a "
                            f"new run: python -m forgather.run --from-snapshot {run_dir} OVERRIDES") from error
        raise
    # Merged into the previous metrics.yaml: a resume that logs no validation (or trains no step, its run having
    # finished before an outcome was recorded) keeps the last val/loss, and returns it as the run's.
    previous = OmegaConf.to_container(OmegaConf.load(run_dir / METRICS_FILE)) if (run_dir / METRICS_FILE).is_file() else {}
    metrics = {**previous, **{key: float(value) for key, value in trainer.callback_metrics.items()}}
    metrics.pop("step", None)
    if trainer.is_global_zero:
        from forgather.data.cache import atomic_write

        text = OmegaConf.to_yaml(OmegaConf.create({"step": trainer.global_step, **metrics}))
        atomic_write(run_dir / METRICS_FILE, lambda path: path.write_text(text))
        _print_where(run_dir, export["out_dir"] if exporting else None, "")
    return metrics


def _export_when(model_dir: Path, run_dir: Path) -> str:
    """When the model is written, and whose model it replaces there (another run's, as every run of an
    experiment exports to the same directory; that run's checkpoints can export it again)."""
    from forgather.callbacks.model_export import read_record

    record = read_record(model_dir) or {}
    other = record.get("run_dir")
    if other and Path(other) != run_dir:
        return f"written when training ends, replacing the model of {other} at step {record.get('step')}"
    return "written when training ends"


def _print_where(run_dir: Path, model_dir: Path | None, when: str) -> None:
    print(f"run directory: {run_dir}", flush=True)
    if model_dir is not None:
        print(f"exported model: {model_dir}{f' ({when})' if when else ''}", flush=True)


def _print_sweep(root: Path, outcomes: list) -> None:
    """The table of a sweep's points (forgather.launch.base.Outcome): status and final metrics."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    keys = sorted({key for outcome in outcomes for key in outcome.metrics if "/" in key})
    table = Table(title=f"sweep: {root}")
    for column in ("#", "overrides", "status", *keys):
        table.add_column(column)
    for outcome in outcomes:
        if outcome.status == "failed":
            table.add_row(str(outcome.number), escape(outcome.label), f"[red]failed: {escape(outcome.error)}[/red]", *[""] * len(keys))
        else:
            table.add_row(str(outcome.number), escape(outcome.label), outcome.status, *[f"{outcome.metrics[k]:.4g}" if k in outcome.metrics else "" for k in keys])
    Console(width=max(160, Console().width)).print(table)


def print_config(args: argparse.Namespace, config: DictConfig, settings: Callable[[], dict[str, Any]]) -> None:
    """`--cfg job|hydra|all`: the config (interpolations resolved with `--resolve`), then under `hydra:` the
    runner's settings (`settings()`; its ${now:...} patterns are filled in when a run starts)."""
    from omegaconf.errors import OmegaConfBaseException

    text = ""
    if args.cfg in ("job", "all"):
        try:
            text += OmegaConf.to_yaml(config, resolve=args.resolve)
        except OmegaConfBaseException as error:
            message = str(error).splitlines()[0]
            raise ValueError(f"--resolve: config key {error.full_key}: {message} (set it, or print without --resolve)") from error
    if args.cfg in ("hydra", "all"):
        text += OmegaConf.to_yaml({"hydra": settings()})
    print(text, end="")


def _from_run_dir(args: argparse.Namespace, command: list[str], run_dir: Path, resume: bool) -> int:
    """--from-snapshot / --resume: the recorded config, model source from the snapshot copy.

    A resume continues from the newest checkpoint, in the run's own directory, and exports to where the run
    exported (recorded in its snapshot). A run already at its max_steps is left as it is, unless its model
    export is missing or not its own (killed, disk full): then only the export is done again."""
    config, meta = _read_snapshot(run_dir)
    base_dir = _recorded_model_src(run_dir, meta)
    points = ovr.parse(args.overrides, {}, multirun=args.multirun)
    if len(points) > 1:  # -m with sweep values: one recorded run cannot become a sweep
        raise ovr.OverrideError(
            "a sweep with --resume: a resume continues one run with one set of values (give single values)"
            if resume
            else f"a sweep with --from-snapshot: a snapshot reruns one run; to sweep, run the experiment: -m +experiment={meta.get('experiment', 'NAME')} ..."
        )
    if resume and any(o.key == "output_dir" for o in points[0]):
        raise ovr.OverrideError(f"output_dir: a resumed run stays in {run_dir}; to run its config elsewhere use --from-snapshot {run_dir} output_dir=DIR")
    for override in points[0]:  # a group choice (optimizer=adafactor): the recorded config has no groups left
        node = OmegaConf.select(config, override.key, default=None, throw_on_missing=False)
        if override.kind != "delete" and isinstance(node, DictConfig) and "_target_" in node:
            flag = "--resume" if resume else "--from-snapshot"
            raise ovr.OverrideError(
                f"{override.text}: {flag} runs the config as it was recorded, where {override.key} is "
                f"{node._target_}; group choices are made when an experiment is rendered: start a new run, "
                f"python -m forgather.run +experiment={meta.get('experiment', 'NAME')} {override.text} ..., or change "
                f"its arguments ({override.key}.NAME=...)")
    recorded_dir = OmegaConf.select(config, "output_dir", default=None, throw_on_missing=False)
    ovr.apply(config, points[0])
    experiment = str(meta.get("experiment", "run"))
    ckpt_path = None
    rollback = getattr(args, "checkpoint", None) if resume else None
    if resume:
        ckpt_path = chosen_checkpoint(run_dir, rollback) if rollback else latest_checkpoint(run_dir)
        if ckpt_path is None:
            raise FileNotFoundError(f"{run_dir / CHECKPOINTS_DIR} holds no checkpoint: nothing to resume (use --from-snapshot to start over)")
        step = resume_step(run_dir, ckpt_path)
        target = run_dir
        export = export_settings(args.outputs, experiment, base_dir)
        if meta.get("export_dir"):
            export["out_dir"] = _export_dir_of_moved_run(Path(meta["export_dir"]), recorded_dir, run_dir)
    else:
        fresh = Path(args.outputs) / "outputs" / experiment / _timestamp()
        requested = requested_run_dir(points[0], create=not args.cfg)  # --cfg prints where the run would go, makes nothing
        target = Path(os.environ.get(RUN_DIR_ENV) or requested or (fresh.resolve() if args.cfg else _fresh_dir(fresh)))
        export = export_settings(args.outputs, experiment, base_dir)
    config.output_dir = str(target)
    if args.cfg:
        settings = {"mode": "RUN", "overrides": {"task": list(args.overrides)}, "runtime": {**meta, "from_run": str(run_dir)}, "run": {"dir": str(target)}}
        print_config(args, config, lambda: settings)
        return 0
    if ckpt_path is not None and not _announce_resume(config, run_dir, ckpt_path, step, export["out_dir"]):
        return 0
    from forgather.callbacks.snapshot import recorded_threads
    from forgather.graph import construct, generate_code

    def construct_again() -> dict[str, Any]:
        with tracking_from_project(meta.get("from_project")):  # other projects' configs: still as recorded?
            built = construct(config, base_dir=base_dir)
        if rollback and run_lock.first_rank():  # under the run's lock, once the config has built
            set_aside(run_dir, newer_than(run_dir, ckpt_path))
        return built

    snapshot = {
        "overrides": list(args.overrides),
        "meta": {**meta, "from_run": str(run_dir), "export_dir": str(export["out_dir"])},
        "command": command,
    }
    if not resume:  # a resume keeps its snapshot; a replay's records what it ran, so that it replays as well
        snapshot["sources"] = {path.name: path for path in sorted((run_dir / "snapshot" / "sources").glob("*"))}
        snapshot["model_code"] = generate_code(config, "model", base_dir=base_dir) if "model" in config else None
    with _run_dir_env(target), (contextlib.nullcontext() if resume else recorded_threads(run_dir)):
        if not resume:
            _warn_about_replay_differences(run_dir, config)
        train(
            config,
            target,
            construct=construct_again,
            snapshot=snapshot,
            export=export,
            ckpt_path=str(ckpt_path) if ckpt_path else None,
        )
    return 0


def _warn_about_replay_differences(run_dir: Path, config: DictConfig) -> None:
    """--from-snapshot: one line for each thing that makes this replay differ from the recorded run (its snapshot
    edited or cut, other package versions, Forgather's code, environment variables, data)."""
    from forgather.callbacks.snapshot import replay_differences

    for line in replay_differences(run_dir, config):
        print(f"warning: --from-snapshot {run_dir}: {line}", file=sys.stderr, flush=True)


def _export_dir_of_moved_run(recorded: Path, recorded_run_dir: Any, run_dir: Path) -> Path:
    """Where a resumed run exports: where its snapshot says, unless the run directory has moved since (its outputs
    tree moved or copied to another disk or mount point) and that place, taken relative to the run directory as it
    was, is beside the new one (its output_models/ came along): the model goes with the run, not back to the old
    tree (made again where it was removed) or over the model of the run it was copied from."""
    if not isinstance(recorded_run_dir, str) or Path(recorded_run_dir) == run_dir:
        return recorded
    moved = Path(os.path.normpath(run_dir / os.path.relpath(recorded, recorded_run_dir)))
    return moved if moved != recorded and moved.parent.is_dir() else recorded


EXPORTS_DIR = "exports"  # a run's checkpoints exported as model directories: <run_dir>/exports/step-N


def export_checkpoint(run_dir: Path, ckpt_path: Path | None = None, out_dir: Path | None = None,
                      reuse: bool = False) -> Path:
    """Write the model of one checkpoint of a run (default: its newest) as a model directory, as the run's own
    export at the end of training would be: `forgather inf server -m`, `forgather convert` and transformers
    load it. The run's recorded config builds the module (compiled parts left uncompiled) and its tokenizer;
    the run directory is only read, so a run still training is left alone. Default destination:
    <run_dir>/exports/step-N; with `reuse`, one already there for that step is taken as it is. Returns the
    directory."""
    import torch

    from forgather.callbacks.model_export import ExportModel
    from forgather.graph import construct

    config, meta = _read_snapshot(run_dir)
    if "model" not in config:
        raise ValueError(f"{run_dir}: its config has no `model` target to export")
    base_dir = _recorded_model_src(run_dir, meta)
    ckpt_path = ckpt_path or latest_checkpoint(run_dir)
    if ckpt_path is None:
        raise FileNotFoundError(f"{run_dir / CHECKPOINTS_DIR} holds no checkpoint yet; `forgather control save JOB` "
                                f"writes one from a running job")
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint; give one of {run_dir / CHECKPOINTS_DIR}")
    if ckpt_path.is_dir():
        raise ValueError(f"{ckpt_path}: a sharded checkpoint (the pipeline strategy's); resume the run to export "
                         f"it: python -m forgather.run --resume {run_dir}")
    if out_dir is None and reuse:
        from forgather.callbacks.model_export import read_record

        step = readable_step(ckpt_path)
        existing = run_dir / EXPORTS_DIR / f"step-{step}"
        if step is not None and (read_record(existing) or {}).get("step") == step:
            return existing  # exported before: a checkpoint's weights never change
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        step, weights = int(state["global_step"]), state["state_dict"]
    except Exception as error:  # cut short, or not a Lightning checkpoint
        readable = _newest_readable(run_dir, besides=ckpt_path)
        hint = (f"export {readable[0].name} (step {readable[1]}), the newest one that reads: --checkpoint {readable[0]}"
                if readable else "no other checkpoint of this run reads")
        raise _unreadable(ckpt_path, hint) from error
    with tracking_from_project(meta.get("from_project")):
        built = construct(config, ["module", "datamodule"], base_dir=base_dir)
    module = built["module"]
    module.compile = False  # the weights are the same; compiling is for training speed
    module.configure_model()
    own = set(module.state_dict())
    weights = {key if key in own else key.replace("._orig_mod", ""): value for key, value in weights.items()}
    dtypes = {value.dtype for value in weights.values() if value.is_floating_point()}
    if len(dtypes) == 1:  # a run in pure bf16 (Lightning's bf16-true): exported in bf16, as the run would
        module.to(dtypes.pop())
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        mismatch = _checkpoint_mismatch(error) or str(error).splitlines()[0]
        raise UserError(f"{ckpt_path}: the checkpoint does not fit the run's recorded model: {mismatch}") from error
    experiment = str(meta.get("experiment", "run"))
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EXPORTS_DIR / f"step-{step}"
    exporter = ExportModel(out_dir, experiment.replace("/", "_"), config.model, base_dir=base_dir, run_dir=run_dir)
    return exporter.export(module.model, getattr(built["datamodule"], "tokenizer", None), step=step, record_in_run=False)


def _recorded_model_src(run_dir: Path, meta: dict[str, Any]) -> str | None:
    """Where a recorded run's model source is: the snapshot's copy, else the directory its meta names."""
    copy = run_dir / "snapshot" / "sources" / "model_src"
    return str(copy) if copy.is_dir() else meta.get("model_src")


def _read_snapshot(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The recorded config and meta of a run directory; what is missing or does not parse is named."""
    snapshot = run_dir / "snapshot"
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such directory"
        raise FileNotFoundError(f"{run_dir}: {what}; give a run directory (outputs/<experiment>/<time>)")
    if not (snapshot / "config.yaml").is_file():
        if (run_dir / CHECKPOINTS_DIR).is_dir():
            raise FileNotFoundError(f"{run_dir} has checkpoints but no snapshot/config.yaml: a run's config is recorded "
                                    f"only there; restore snapshot/ from a copy of the run")
        raise FileNotFoundError(f"{run_dir} has no snapshot/config.yaml: not a Forgather run directory; give the "
                                f"directory a run prints as `run directory:`")
    if not (snapshot / "meta.yaml").is_file():
        raise FileNotFoundError(f"{snapshot / 'meta.yaml'}: missing, the snapshot is incomplete; restore it from a copy of the run")
    fix = "restore it from a copy of the run"
    config = read_recorded(snapshot / "config.yaml", DictConfig, fix, parse=lambda text: OmegaConf.create(text) or None)
    return config, read_recorded(snapshot / "meta.yaml", dict, fix)


def _auto_resume(args: argparse.Namespace, command: list[str]) -> int | None:
    """--auto-resume: the run in `output_dir=DIR` continued from its newest checkpoint (or left as it is when
    finished), if DIR holds this run (the same overrides) with a checkpoint; None to start the run in DIR (new,
    empty, or holding this run stopped before its first checkpoint, which starts over). A job script that a
    scheduler requeues after a preemption or a time limit runs the same line again and continues."""
    if args.multirun:
        raise ovr.OverrideError("--auto-resume with -m: a sweep continues with --resume multirun/<time>")
    target = next((o.value for o in ovr.parse(args.overrides, {}, multirun=False)[0]
                   if o.key == "output_dir" and o.kind != "delete"), None)
    if target is None:
        raise ovr.OverrideError("--auto-resume needs output_dir=DIR, the directory where the run is found again "
                                "(e.g. output_dir=runs/$SLURM_JOB_ID)")
    run_dir = Path(str(target)).expanduser().resolve()
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    from forgather.launch.sweep import recorded_overrides

    _read_snapshot(run_dir)  # a directory that holds something else is named
    recorded = recorded_overrides(run_dir)
    if recorded is None:
        raise FileNotFoundError(f"{run_dir / 'snapshot' / 'overrides.yaml'}: missing, the snapshot is incomplete; restore "
                                f"it from a copy of the run (--auto-resume compares the overrides it records)")
    if recorded != list(args.overrides):
        raise ovr.OverrideError(f"--auto-resume: {run_dir} holds a run started with other overrides ({' '.join(map(str, recorded or []))}); "
                                f"give the same ones to continue it, or another output_dir")
    if latest_checkpoint(run_dir) is None:
        print(f"{run_dir}: stopped before its first checkpoint; starting it over", flush=True)
        args.restart_in = run_dir  # Runner.run_dir takes it as it is, not empty
        return None
    again = argparse.Namespace(**{**vars(args), "overrides": [], "auto_resume": False, "resume": str(run_dir)})
    return _from_run_dir(again, command, run_dir, resume=True)


def _say_resuming(run_dir: Path, ckpt_path: Path, step: int) -> None:
    """The line every resume prints (a run's, a sweep point's): sweep tests and users grep for it."""
    print(f"resuming {run_dir} from {ckpt_path.name} (step {step})", flush=True)


def _last_resume_overrides(run_dir: Path) -> list[str] | None:
    """The overrides of the run's latest resume that gave any (callbacks.snapshot records them), or None."""
    from forgather.callbacks.snapshot import recorded_resumes

    given = [entry["overrides"] for entry in recorded_resumes(run_dir) if isinstance(entry.get("overrides"), list) and entry["overrides"]]
    return [str(override) for override in given[-1]] if given else None


def _announce_resume(config: DictConfig, run_dir: Path, ckpt_path: Path, step: int, export_dir: Path) -> bool:
    """Say what --resume will do from `ckpt_path` (at `step`); False when there is nothing to do (the run is
    finished and exported). A checkpoint past the config's max_steps that the run did not export is from a resume
    that raised max_steps and was stopped (its `continue with:` line names no max_steps): taken for finished, its
    mid-training weights would replace the model the run exported when it did finish; refused instead."""
    from forgather.callbacks.model_export import exported_step

    max_steps = OmegaConf.select(config, "trainer.max_steps", default=None)
    if not (isinstance(max_steps, int) and 0 < max_steps <= step):
        _say_resuming(run_dir, ckpt_path, step)
        return True
    if "model" in config and step > max_steps and exported_step(run_dir) != step:
        again = shlex.join(_last_resume_overrides(run_dir) or ["max_steps=N"])
        raise UserError(f"{run_dir}: {ckpt_path.name} is at step {step}, past max_steps={max_steps}: a resume raised "
                        f"max_steps and stopped before it finished ; give its overrides again to go on: python -m "
                        f"forgather.run --resume {run_dir} {again} (max_steps={step} ends it there and exports it)")
    if "model" in config and exported_step(run_dir) != step:
        print(f"{run_dir} finished at step {step}, but its model export did not complete: exporting it to {export_dir}", flush=True)
        return True
    print(f"{run_dir} already finished at step {step} (max_steps={max_steps}): nothing to do; "
          f"to train on, raise max_steps: --resume {run_dir} max_steps=N", flush=True)
    return False


def _print_info(runner: Runner, point: list[ovr.Override]) -> None:
    """The search path, every group's options, then the option of each group the experiment (given by
    `+experiment=`, or the project's default) uses with the group choices of `point` applied."""
    print("search path:")
    for path in runner.search_path:
        print(f"  {path}")
    print("groups (choose with group=option):")
    for group, options in runner.groups.items():
        if group not in TEMPLATE_DIRS:
            print(f"  {group}: {', '.join(options)}")
    choices, _ = ovr.split_choices(point, runner.groups)
    if "experiment" in choices or runner.project.meta.get("default_config"):
        experiment, loaded = runner.load(choices)
        print(f"experiment {experiment} ({loaded.template}) uses:")
        for group, option in runner.choices(loaded).items():
            print(f"  {group}={option}")


def _is_multirun(directory: Path) -> bool:
    from forgather.launch.sweep import is_multirun

    return is_multirun(directory)


def _job_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of the job itself; launcher and sweeper settings apply to sweeps only (`-m`)."""
    from forgather.launch.settings import is_runner_override

    runner = [a for a in args.overrides if is_runner_override(a)]
    if runner and not args.multirun:
        raise ovr.OverrideError(f"{runner[0]}: launchers and sweepers run sweeps: add -m")
    return [a for a in args.overrides if not is_runner_override(a)]


def _resume_multirun(args: argparse.Namespace, command: list[str], root: Path) -> int:
    """`--resume MULTIRUN_DIR`: the recorded sweep again, running only the points that did not finish.
    Launcher and sweeper settings may change (`launcher.jobs=2`); the points may not."""
    from forgather.launch.settings import is_runner_override
    from forgather.launch.sweep import read_record

    changed = [a for a in args.overrides if not is_runner_override(a)]
    if changed:
        raise ovr.OverrideError(f"{changed[0]}: a resumed sweep runs the points it recorded; only launcher and sweeper settings may change (launcher.jobs=2)")
    record = read_record(root)
    argv = ["--outputs", record["outputs"], "-m", *(["-p", record["project"]] if record["project"] else [])]
    argv += ["-d", record["devices"]] if record.get("devices") else []
    for path in record["template_path"]:
        argv += ["--template-path", path]
    recorded = build_parser().parse_intermixed_args(argv)
    return Runner.create(recorded, command).sweep([*record["overrides"], *record["runner"], *args.overrides], root=root)


_DEVICE = r"(\d+|(GPU|MIG)-[\w-]+)"  # an index, or a UUID as nvidia-smi -L prints it


def _check_devices(devices: str) -> None:
    """-d takes what CUDA_VISIBLE_DEVICES takes, GPU indices or UUIDs: `-d 0,,1` would count three devices."""
    if not re.fullmatch(rf"{_DEVICE}(,{_DEVICE})*", devices):
        raise ValueError(f"-d {devices!r}: not a list of GPU indices; give them separated by commas, e.g. -d 0,1 "
                         f"(or the UUIDs nvidia-smi -L prints)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_intermixed_args(argv)
    command = [sys.executable, "-m", "forgather.run", *argv]
    try:
        if args.checkpoint is not None and not args.resume:
            raise UserError("--checkpoint NAME_OR_STEP goes with --resume RUN_DIR: it names the checkpoint of that "
                            "run to continue from")
        if args.resume:
            args.resume, args.checkpoint = resume_arguments(args.resume, args.checkpoint)
        if args.resolve and not args.cfg:
            raise ValueError("--resolve resolves what --cfg prints: add --cfg (or --cfg all)")
        if os.path.exists(args.outputs) and not os.path.isdir(args.outputs):
            raise ValueError(f"--outputs {args.outputs}: a file, not a directory; give the directory where outputs/ and multirun/ go")
        if args.devices is not None:
            _check_devices(args.devices)
        if args.strict:
            os.environ[STRICT_ENV] = "1"  # sweep points and launched ranks inherit it
        if args.devices and not os.environ.get(SWEEP_POINT_ENV):  # a point sees the GPUs its launcher gave it
            os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
        if args.dry_run:
            if not (args.resume or args.from_snapshot or args.multirun):
                # What the run would read first, as --cfg does: a misspelled key or option says so here.
                runner = Runner.create(args, command)
                runner.job(ovr.parse(_job_overrides(args), runner.groups, False)[0])
            launch = shlex.join([a for a in command if a != "--dry-run"])
            print(f"CUDA_VISIBLE_DEVICES={args.devices} {launch}" if args.devices else launch)
            return 0
        if args.resume and _is_multirun(Path(args.resume)):
            if args.checkpoint is not None:
                raise UserError(f"--checkpoint with a sweep ({args.resume}): it rolls back one run, a sweep's points "
                                f"have checkpoints of their own")
            return _resume_multirun(args, command, Path(args.resume).resolve())
        if args.resume or args.from_snapshot:
            return _from_run_dir(args, command, Path(args.resume or args.from_snapshot).resolve(), resume=bool(args.resume))
        if args.auto_resume and (code := _auto_resume(args, command)) is not None:
            return code
        runner = Runner.create(args, command)
        if os.environ.get(SWEEP_POINT_ENV):  # a point of a sweep, started by its launcher (forgather.launch)
            from forgather.launch.point import end_with_launcher, run_recorded

            end_with_launcher()
            point_dir = Path(os.environ[SWEEP_POINT_ENV])
            point = ovr.parse(args.overrides, runner.groups, multirun=False)[0]
            return run_recorded(point_dir, lambda callbacks: runner.run_point(point, point_dir, callbacks))
        if args.multirun and not args.cfg and not args.info:
            return runner.sweep(args.overrides)
        if args.multirun and args.cfg:
            points = runner.sweep_points(args.overrides)
        else:
            points = ovr.parse(_job_overrides(args), runner.groups, args.multirun)
        if args.info:
            _print_info(runner, points[0])
            return 0
        if args.multirun and any(o.key == "output_dir" for point in points for o in point):
            raise ovr.OverrideError("output_dir with -m: each point of a sweep runs in multirun/<time>/<n>/; choose where multirun/ goes with --outputs DIR")
        for number, point in enumerate(points):
            if len(points) > 1:
                print(f"# run {number}: {' '.join(f'{o.key}={o.value}' for o in point)}")
            runner.run_point(point)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before training (data, tokenizer, compile); in training JobControl catches it
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as error:
        return report(error)


if __name__ == "__main__":
    sys.exit(main())
