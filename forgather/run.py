"""`python -m forgather.run`: pick an experiment, apply overrides, train with Lightning, keep a snapshot.

    python -m forgather.run +experiment=tiny_llama lr=3e-4 optimizer=adafactor
    python -m forgather.run -m +experiment=tiny_llama lr=1e-3,3e-4 optimizer=adamw,adafactor
    python -m forgather.run --from-snapshot outputs/tiny_llama/2026-11-24_10-00-00     (rerun exactly)
    python -m forgather.run --resume outputs/tiny_llama/2026-11-24_10-00-00            (continue)

Flow of one run: `+experiment=NAME` names `configs/NAME.yaml` of the project (-p, default the current
directory when it holds a meta.yaml) or `experiment/NAME.yaml` on the search path. Group choices
(`optimizer=adafactor`) are template variables; the template must actually include `GROUP/OPTION.yaml`.
The rendered config goes through the graph to an OmegaConf config, value overrides are applied
(forgather.overrides), `output_dir` is set to the run directory, and the targets are constructed:
`trainer`, `module` and `datamodule`, after seeding with `seed`. A `Snapshot` callback records the run,
then `trainer.fit` runs. Final metrics land in `<run_dir>/metrics.yaml`.

Run directories: `outputs/<experiment>/<timestamp>/`; sweeps `multirun/<timestamp>/<n>/`, ending with a
table of every point's final metrics (a failing point is reported, the others still run). The run
directory is fixed before Lightning starts other ranks (FORGATHER_RUN_DIR), so every rank agrees on it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from forgather import overrides as ovr
from forgather.project import META_FILE, LoadedConfig, Project, conf_dir
from forgather.template import TemplateEnvironment

RUN_DIR_ENV = "FORGATHER_RUN_DIR"
METRICS_FILE = "metrics.yaml"
CHECKPOINTS_DIR = "checkpoints"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m forgather.run", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="+experiment=NAME, group=option, key=value, +key=value, ++key=value, ~key")
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep: run every combination of comma lists, range(), choice(), glob()")
    parser.add_argument("-p", "--project", help="project directory (default: the current directory if it has a meta.yaml)")
    parser.add_argument("--template-path", action="append", default=[], metavar="DIR", help="extra template directory")
    parser.add_argument("--cfg", action="store_true", help="print the config as it would run, and exit")
    parser.add_argument("--info", action="store_true", help="list groups and their options, and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the launch command, and exit")
    parser.add_argument("-d", "--devices", help="GPU indices to train on, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--outputs", default=".", help="where outputs/ and multirun/ go (default: current directory)")
    parser.add_argument("--dynamic-args", type=json.loads, default={}, metavar="JSON", help="values of the config's declared arguments (dynamic_args), as `forgather train` passes them")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-snapshot", metavar="RUN_DIR", help="rerun the config recorded in RUN_DIR's snapshot")
    source.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run. Checkpoints are written atomically, so every one found is whole;
    a run killed between writing a step checkpoint and updating last.ckpt resumes from the step checkpoint."""
    # A file, or a directory of shards (the pipeline strategy's checkpoints hold a meta.pt).
    found = [p for p in (run_dir / CHECKPOINTS_DIR).glob("*.ckpt") if p.is_file() or (p / "meta.pt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


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

    # -- runs -----------------------------------------------------------------------------------------

    def run_dir(self, experiment: str) -> Path:
        if os.environ.get(RUN_DIR_ENV):
            return Path(os.environ[RUN_DIR_ENV])
        return _fresh_dir(Path(self.args.outputs) / "outputs" / experiment / _timestamp())

    def run_point(self, point: list[ovr.Override], run_dir: Path | None = None) -> dict[str, float] | None:
        sweeping = run_dir is not None
        choices, values = ovr.split_choices(point, self.groups)
        experiment, loaded = self.load(choices)
        config = loaded.config.copy()
        ovr.apply(config, values)
        if self.args.cfg:
            print(OmegaConf.to_yaml(config), end="")
            return None
        run_dir = run_dir or self.run_dir(experiment)
        config.output_dir = str(run_dir)
        meta = {"experiment": experiment, "template": loaded.template, "project_dir": self.project.root, "model_src": self.project.model_src}
        model_code = loaded.code("model", config) if "model" in config else None
        with _run_dir_env(run_dir):
            return train(
                config,
                run_dir,
                construct=lambda: loaded.construct(config=config),
                snapshot={
                    "overrides": [o.text for o in point],
                    "sources": self.sources(loaded),
                    "meta": meta,
                    "model_code": model_code,
                    "command": self.command,
                },
                export=export_settings(self.args.outputs, experiment, self.project.model_src, run_dir if sweeping else None),
            )

    def sweep(self, points: list[list[ovr.Override]]) -> int:
        root = _fresh_dir(Path(self.args.outputs) / "multirun" / _timestamp())
        swept = [i for i in range(len(points[0])) if len({p[i].value for p in points}) > 1]
        results: list[tuple[str, dict[str, float] | str]] = []
        for number, point in enumerate(points):
            label = " ".join(f"{point[i].key}={point[i].value}" for i in swept)
            print(f"[sweep {number + 1}/{len(points)}] {label}", flush=True)
            try:
                metrics = self.run_point(point, root / str(number))
                results.append((label, metrics or {}))
            except Exception as error:  # one failing point must not stop the others
                traceback.print_exc()
                results.append((label, f"{type(error).__name__}: {error}"))
        _print_sweep(root, results)
        return 1 if any(isinstance(outcome, str) for _, outcome in results) else 0


def export_settings(outputs: str, experiment: str, base_dir: str | None, sweep_point: Path | None = None) -> dict[str, Any]:
    """Where a run's trained model goes: `<outputs>/output_models/<experiment>`; a sweep point's stays in its
    own run directory (`<point>/model`), so the points do not overwrite each other."""
    name = experiment.replace("/", "_")
    out_dir = sweep_point / "model" if sweep_point else Path(outputs).resolve() / "output_models" / name
    return {"out_dir": out_dir, "name": name, "base_dir": base_dir}


def train(
    config: DictConfig,
    run_dir: Path,
    construct,
    snapshot: dict[str, Any],
    export: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Seed, construct trainer/module/datamodule, attach the snapshot (and model export), fit; returns the
    final metrics."""
    import pytorch_lightning as pl

    from forgather.callbacks.model_export import ExportModel
    from forgather.callbacks.snapshot import Snapshot

    run_dir.mkdir(parents=True, exist_ok=True)
    if "seed" in config:
        pl.seed_everything(int(config.seed), workers=True, verbose=False)
    built = construct()
    missing = [name for name in ("trainer", "module", "datamodule") if name not in built]
    if missing:
        raise ValueError(f"the config has no target {', '.join(missing)}: a training experiment defines trainer, module and datamodule")
    trainer = built["trainer"]
    trainer.callbacks.append(Snapshot(run_dir, config=config, **snapshot))
    if export is not None and "model" in config:
        trainer.callbacks.append(ExportModel(model_config=config.model, **export))
    trainer.fit(built["module"], datamodule=built["datamodule"], ckpt_path=ckpt_path)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        from forgather.data.cache import atomic_write

        text = OmegaConf.to_yaml(OmegaConf.create({"step": trainer.global_step, **metrics}))
        atomic_write(run_dir / METRICS_FILE, lambda path: path.write_text(text))
    return metrics


def _print_sweep(root: Path, results: list[tuple[str, dict[str, float] | str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = sorted({key for _, outcome in results if isinstance(outcome, dict) for key in outcome if "/" in key})
    table = Table(title=f"sweep: {root}")
    for column in ("#", "overrides", *keys):
        table.add_column(column)
    for number, (label, outcome) in enumerate(results):
        if isinstance(outcome, str):
            table.add_row(str(number), label, f"[red]failed: {outcome}[/red]", *[""] * (len(keys) - 1))
        else:
            table.add_row(str(number), label, *[f"{outcome[k]:.4g}" if k in outcome else "" for k in keys])
    Console(width=max(160, Console().width)).print(table)


def _from_run_dir(args: argparse.Namespace, command: list[str], run_dir: Path, resume: bool) -> int:
    """--from-snapshot / --resume: the recorded config, model source from the snapshot copy."""
    import yaml

    snapshot = run_dir / "snapshot"
    if not (snapshot / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no snapshot/config.yaml: is it a Forgather run directory?")
    config = OmegaConf.load(snapshot / "config.yaml")
    meta = yaml.safe_load((snapshot / "meta.yaml").read_text()) or {}
    base_dir = str(snapshot / "sources" / "model_src") if (snapshot / "sources" / "model_src").is_dir() else meta.get("model_src")
    points = ovr.parse(args.overrides, {}, multirun=False)
    ovr.apply(config, points[0])
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(run_dir)
        if ckpt_path is None:
            raise FileNotFoundError(f"{run_dir / CHECKPOINTS_DIR} holds no checkpoint: nothing to resume (use --from-snapshot to start over)")
        print(f"resuming {run_dir} from {ckpt_path.name}", flush=True)
        target = run_dir
    else:
        target = Path(os.environ.get(RUN_DIR_ENV) or _fresh_dir(Path(args.outputs) / "outputs" / meta.get("experiment", "run") / _timestamp()))
    config.output_dir = str(target)
    if args.cfg:
        print(OmegaConf.to_yaml(config), end="")
        return 0
    from forgather.graph import construct

    with _run_dir_env(target):
        train(
            config,
            target,
            construct=lambda: construct(config, base_dir=base_dir),
            snapshot={"overrides": list(args.overrides), "meta": {**meta, "from_run": str(run_dir)}, "command": command},
            export=export_settings(args.outputs, str(meta.get("experiment", "run")), base_dir),
            ckpt_path=str(ckpt_path) if ckpt_path else None,
        )
    return 0


def _print_info(runner: Runner) -> None:
    print("search path:")
    for path in runner.search_path:
        print(f"  {path}")
    print("groups (choose with group=option):")
    for group, options in runner.groups.items():
        if group not in ("base", "configs"):
            print(f"  {group}: {', '.join(options)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_intermixed_args(argv)
    command = [sys.executable, "-m", "forgather.run", *argv]
    try:
        if args.devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = args.devices
        if args.dry_run:
            launch = shlex.join([a for a in command if a != "--dry-run"])
            print(f"CUDA_VISIBLE_DEVICES={args.devices} {launch}" if args.devices else launch)
            return 0
        if args.resume or args.from_snapshot:
            return _from_run_dir(args, command, Path(args.resume or args.from_snapshot).resolve(), resume=bool(args.resume))
        runner = Runner.create(args, command)
        if args.info:
            _print_info(runner)
            return 0
        points = ovr.parse(args.overrides, runner.groups, args.multirun)
        if args.multirun and not args.cfg:
            return runner.sweep(points)
        for number, point in enumerate(points):
            if len(points) > 1:
                print(f"# run {number}: {' '.join(f'{o.key}={o.value}' for o in point)}")
            runner.run_point(point)
        return 0
    except Exception as error:
        from forgather.cli.common import report_error

        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
