"""`Snapshot`: a Lightning callback that records what a run needs to be reproduced, before its first step.

Writes `<run_dir>/snapshot/` once, on global rank 0, in `setup("fit")`:

    config.yaml            the config as run (overrides applied; interpolations kept, so it still constructs
                           with the same sharing and still takes overrides)
    config_resolved.yaml   the same with every interpolation resolved, for reading
    overrides.yaml         the command-line overrides
    command.txt            the command line
    meta.yaml              experiment, project and model-source paths, host, versions, time
    git.yaml, git.diff     commit, branch and uncommitted changes, when the project is in a git repository
    pip_freeze.txt         installed distributions and versions
    sources/...            copies of the given files: template sources, project-local Python modules
    model_code.py          standalone Python building the model (`forgather code --target model`), if given

The directory is assembled beside its final place and renamed into it (atomic); an existing snapshot (a
resumed run) is left as it is, and the resume is added to its `resumes.yaml` (in `on_train_start`, once the
checkpoint is restored): the time, the checkpoint and step it continued from, its overrides and command line.
Without it the overrides a run was resumed with (`max_steps=`, `lr=`) were recorded nowhere. Usable from plain
Lightning code: every argument is optional.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import yaml

SNAPSHOT_DIR = "snapshot"
RESUMES_FILE = "resumes.yaml"


def recorded_resumes(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The resumes of a run, oldest first, as its `snapshot/resumes.yaml` records them: [] when there is none or it
    does not read."""
    try:
        resumes = yaml.safe_load((Path(run_dir) / SNAPSHOT_DIR / RESUMES_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [entry for entry in resumes if isinstance(entry, dict)] if isinstance(resumes, list) else []


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _pip_freeze() -> str:
    packages = {(dist.metadata["Name"] or "?"): dist.version for dist in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(packages.items(), key=lambda kv: kv[0].lower()))


class Snapshot(pl.Callback):
    """Record a run for reproduction (see the module docstring).

    Args:
        run_dir: the run's directory; the snapshot goes to `<run_dir>/snapshot/` (default: the trainer's
            log_dir, e.g. lightning_logs/version_N, else its default_root_dir).
        config: the run's OmegaConf config (or any mapping).
        overrides: the command-line overrides, as typed.
        sources: files to copy, as {name inside sources/: path}; directories are copied whole.
        meta: extra facts for meta.yaml (experiment name, project dir, model source dir ...).
        model_code: Python source that builds the model without Forgather.
        command: the command line that started the run (default: this process's).
        repo_dir: where to look for a git repository (default: the current directory).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        config: Any = None,
        overrides: list[str] | tuple[str, ...] = (),
        sources: dict[str, str | os.PathLike] | None = None,
        meta: dict[str, Any] | None = None,
        model_code: str | None = None,
        command: list[str] | None = None,
        repo_dir: str | os.PathLike | None = None,
    ) -> None:
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise ValueError(f"Snapshot(run_dir={run_dir!r}): run_dir takes a directory's path (or None: the "
                             "trainer's log_dir)")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"Snapshot(run_dir={str(run_dir)!r}): that is a file; run_dir takes a directory "
                             "(created if missing), the snapshot goes to run_dir/snapshot/")
        if sources is not None and not isinstance(sources, Mapping):
            raise ValueError(f"Snapshot(sources={sources!r}): sources takes a mapping {{name inside sources/: path}}, "
                             "e.g. {'train.py': __file__}")
        self.config = config
        self.overrides = list(overrides)
        self.sources = dict(sources or {})
        self.meta = dict(meta or {})
        self.model_code = model_code
        self.command = list(command) if command is not None else [sys.executable, *sys.argv]
        self.repo_dir = Path(repo_dir or os.getcwd())
        self._continued = False  # this fit found the snapshot written: a resume, recorded in resumes.yaml

    @property
    def path(self) -> Path:
        if self.run_dir is None:
            raise ValueError("Snapshot(run_dir=None) learns its directory from the Trainer it is given to; "
                             "give run_dir to write it outside a fit")
        return self.run_dir / SNAPSHOT_DIR

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.run_dir is None:
            self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._continued = stage == "fit" and self.path.exists()
        if stage == "fit" and trainer.is_global_zero and not self.path.exists():
            self.write()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._continued and trainer.is_global_zero and trainer.ckpt_path is not None:
            self.record_resume(Path(trainer.ckpt_path).name, trainer.global_step)

    def record_resume(self, checkpoint: str, step: int) -> None:
        """Add a resume to `resumes.yaml` (rewritten atomically); one that does not read as a list is left as it is."""
        path = self.path / RESUMES_FILE
        try:
            resumes = yaml.safe_load(path.read_text()) if path.is_file() else []
        except (OSError, yaml.YAMLError):
            return
        if not isinstance(resumes, list):
            return
        resumes.append({"started": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": checkpoint,
                        "step": step, "overrides": self.overrides, "command": shlex.join(self.command)})
        staging = path.with_name(f".{RESUMES_FILE}.tmp-{os.getpid()}")
        try:
            staging.write_text(yaml.safe_dump(resumes, sort_keys=False))
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)

    def write(self) -> Path:
        """Write the snapshot now (atomically) and return its directory."""
        self.path  # noqa: B018 (a run_dir is needed: it says so)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        staging = self.run_dir / f".{SNAPSHOT_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            self._write_into(staging)
            os.replace(staging, self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.path

    def _write_into(self, directory: Path) -> None:
        if self.config is not None:
            from omegaconf import OmegaConf

            config = self.config if OmegaConf.is_config(self.config) else OmegaConf.create(self.config)
            (directory / "config.yaml").write_text(OmegaConf.to_yaml(config))
            try:
                (directory / "config_resolved.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
            except Exception as error:  # a config that does not resolve is still worth keeping as is
                (directory / "config_resolved.yaml").write_text(f"# does not resolve: {error}\n")
        (directory / "overrides.yaml").write_text(yaml.safe_dump(self.overrides))
        (directory / "command.txt").write_text(shlex.join(self.command) + "\n")
        (directory / "pip_freeze.txt").write_text(_pip_freeze())
        meta = {
            **self.meta,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "cwd": os.getcwd(),
        }
        (directory / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        self._write_git(directory)
        for name, source in self.sources.items():
            target = directory / "sources" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif Path(source).is_file():
                shutil.copy2(source, target)
        if self.model_code is not None:
            (directory / "model_code.py").write_text(self.model_code)

    def _write_git(self, directory: Path) -> None:
        commit = _git(["rev-parse", "HEAD"], self.repo_dir)
        if commit is None:
            return
        status = _git(["status", "--porcelain"], self.repo_dir) or ""
        info = {
            "commit": commit.strip(),
            "branch": (_git(["rev-parse", "--abbrev-ref", "HEAD"], self.repo_dir) or "").strip(),
            "dirty": bool(status.strip()),
        }
        (directory / "git.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        (directory / "git.diff").write_text(_git(["diff", "HEAD"], self.repo_dir) or "")
