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
    inputs.yaml            a fingerprint of each file or directory the config names (data, tokenizer): sha256
                           of the content up to 64 MiB, size + mtime (+ a manifest of a directory's files) above
    environment.yaml       package versions, a hash of Forgather's own code, the environment variables that
                           steer torch and the data libraries, torch's thread count
    checksums.yaml         sha256 of every file above, to tell a snapshot edited or cut by hand

The directory is assembled beside its final place and renamed into it (atomic); an existing snapshot (a
resumed run) is left as it is, and the resume is added to its `resumes.yaml` (in `on_train_start`, once the
checkpoint is restored): the time, the checkpoint and step it continued from, its overrides and command line.
Without it the overrides a run was resumed with (`max_steps=`, `lr=`) were recorded nowhere. Usable from plain
Lightning code: every argument is optional.

`replay_differences(run_dir, config)` compares a snapshot with the machine a replay runs on: one line for each
thing that differs (a file of the snapshot missing or edited, a package version, Forgather's code, an environment
variable, an input's content), naming it and what to do. A replay is warned, not refused: the user may mean it.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import os
import re
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
INPUTS_FILE = "inputs.yaml"
ENVIRONMENT_FILE = "environment.yaml"
CHECKSUMS_FILE = "checksums.yaml"
HASHED_BYTES = 64 << 20  # inputs up to this size are hashed whole (about 0.1 s); larger ones by size and mtime
VERSIONED = ("torch", "pytorch-lightning", "lightning", "forgather", "numpy", "tokenizers", "transformers", "triton")
# Environment variables that change what a run computes. Not: PL_GLOBAL_SEED and PL_SEED_WORKERS (the run's own
# seeding sets them), cache locations (torch sets TORCHINDUCTOR_CACHE_DIR itself), secrets (never written down).
ENV_PREFIXES = ("CUDA_", "CUBLAS_", "CUDNN_", "NCCL_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_", "KMP_",
                "NVIDIA_TF32", "PYTHONHASHSEED", "TOKENIZERS_", "PL_")
ENV_UNRECORDED = re.compile(r"^PL_GLOBAL_SEED$|^PL_SEED_WORKERS$|CACHE")
SECRET = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|CREDENTIALS?)(_|$)")
# What a replay loses with each record of the snapshot (the others only document the run).
LOSES = {
    "sources/model_src": "the model is built from the project's model source as it is now",
    INPUTS_FILE: "the data the run read is not checked",
    ENVIRONMENT_FILE: "package versions and environment variables are not checked",
    CHECKSUMS_FILE: "the snapshot's files are not checked for edits",
}


def recorded_resumes(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The resumes of a run, oldest first, as its `snapshot/resumes.yaml` records them: [] when there is none or it
    does not read."""
    resumes = _read_yaml(Path(run_dir) / SNAPSHOT_DIR / RESUMES_FILE)
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(paths: list[Path]) -> dict[str, Any]:
    """What identifies the content of what one config string names (a file, a directory, a glob's matches) cheaply:
    the sha256 of the content when it is 64 MiB or less (the same content regenerated matches), else size and mtime;
    several files (a directory's, a glob's) by a manifest of them, hashed."""
    if len(paths) == 1 and paths[0].is_file():
        stat = paths[0].stat()
        if stat.st_size <= HASHED_BYTES:
            return {"size": stat.st_size, "sha256": _sha256_file(paths[0])}
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    files = []
    for path in paths:
        inside = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        files += [(file, file.relative_to(path if len(paths) == 1 else path.parent).as_posix()) for file in inside]
    stats = [file.stat() for file, _ in files]
    by_content = sum(stat.st_size for stat in stats) <= HASHED_BYTES
    manifest = hashlib.sha256()
    for (file, name), stat in zip(files, stats):
        what = _sha256_file(file) if by_content else stat.st_mtime_ns
        manifest.update(f"{name}\0{stat.st_size}\0{what}\n".encode())
    return {"files": len(files), "size": sum(stat.st_size for stat in stats),
            "sha256" if by_content else "manifest_sha256": manifest.hexdigest()}


# Keys of places a run writes to, or caches it may fill: not inputs, whatever they hold.
WRITTEN = re.compile(r"_target_|output|log|save|dirpath|export|cache|root_dir", re.IGNORECASE)


def _strings(node: Any):
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str) and ".py:" in value:  # /path/file.py:Name: code read
                yield value.rpartition(".py:")[0] + ".py"
            elif not WRITTEN.search(str(key)):
                yield from _strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _config_strings(config: Any) -> set[str]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except Exception:  # noqa: BLE001 (a config that does not resolve: its literal strings still name inputs)
            config = OmegaConf.to_container(config, resolve=False)
    return {text for text in _strings(config) if text and "\n" not in text and len(text) <= 4096 and ("/" in text or "." in text)}


def _paths_named(text: str, own: Path | None) -> list[Path]:
    """The files and directories `text` names (a glob: its matches), less the run's own directory and what holds it."""
    matches = sorted(glob.glob(os.path.expanduser(text))) if glob.has_magic(text) else [os.path.expanduser(text)]
    paths = [Path(match).resolve() for match in matches]
    return [path for path in paths if (path.is_file() or (path.is_dir() and "/" in text)) and path != Path(path.anchor)
            and not (own is not None and (path == own or own in path.parents or path in own.parents))]


def named_inputs(config: Any, run_dir: Path | None) -> dict[str, list[Path]]:
    """The files and directories a config names (a data file, a tokenizer directory, the files a glob matches), by
    the string the config gives."""
    own = run_dir.resolve() if run_dir is not None else None
    found = {text: _paths_named(text, own) for text in sorted(_config_strings(config))}
    return {text: paths for text, paths in found.items() if paths or glob.has_magic(text)}


def _forgather_code_hash() -> str:
    """sha256 of the Python source of Forgather and of its installed callbacks and strategies (found, not imported:
    the hash must not depend on what a run happened to import)."""
    from importlib.util import find_spec

    digest = hashlib.sha256()
    roots = [Path(location) for name in ("forgather", "forgather.callbacks", "forgather.strategies")
             if (spec := find_spec(name)) is not None for location in spec.submodule_search_locations or ()]
    for root in dict.fromkeys(roots):
        for file in sorted(root.rglob("*.py")):
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _config_variables(config: Any) -> set[str]:
    """The environment variables a config reads when it resolves (`${oc.env:NAME}`, kept in config.yaml)."""
    from omegaconf import OmegaConf

    if config is None:
        return set()
    text = OmegaConf.to_yaml(config) if OmegaConf.is_config(config) else yaml.safe_dump(config)
    return set(re.findall(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)", text))


def environment(config: Any = None) -> dict[str, Any]:
    """Versions, Forgather's code and the process settings that change a run's numbers (environment.yaml), with
    the environment variables `config` reads."""
    import torch

    read = _config_variables(config)
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    variables = {name: value for name, value in sorted(os.environ.items())
                 if (name.startswith(ENV_PREFIXES) and not ENV_UNRECORDED.search(name) or name in read)
                 and not SECRET.search(name)}
    return {"versions": versions, "forgather_code_sha256": _forgather_code_hash(), "variables": variables,
            "torch_threads": torch.get_num_threads()}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _checksums(directory: Path) -> dict[str, str]:
    return {file.relative_to(directory).as_posix(): _sha256_file(file)
            for file in sorted(directory.rglob("*")) if file.is_file() and file.name not in (CHECKSUMS_FILE, RESUMES_FILE)}


def _files_line(names: list[str], what: str) -> str:
    """One line for the files of one record (sources/model_src/...), the first few named."""
    shown = ", ".join(f"{SNAPSHOT_DIR}/{name}" for name in names[:3])
    return f"{shown}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {what}"


def _record_of(name: str) -> str:
    parts = name.split("/")
    return "/".join(parts[:2]) if parts[0] == "sources" else name


def _snapshot_differences(snapshot: Path) -> list[str]:
    checks = (CHECKSUMS_FILE, INPUTS_FILE, ENVIRONMENT_FILE)
    if not any((snapshot / name).exists() for name in checks):  # a snapshot older than these records: said once
        return [_files_line(list(checks), "not in the snapshot (written before Forgather recorded them, or deleted): "
                                          "its files, data, versions and environment are not checked")]
    recorded = _read_yaml(snapshot / CHECKSUMS_FILE)
    recorded = recorded if isinstance(recorded, dict) else {}
    missing: dict[str, list[str]] = {}
    edited: dict[str, list[str]] = {}
    for name in [*checks, *recorded]:
        path = snapshot / name
        if not path.is_file():
            missing.setdefault(_record_of(name), []).append(name)
        elif name in recorded and _sha256_file(path) != recorded[name]:
            edited.setdefault(_record_of(name), []).append(name)
    lines = [_files_line(sorted(set(names)), f"missing from the snapshot; {LOSES.get(record, 'restore it from a copy of the run to keep the record whole')}")
             for record, names in missing.items()]
    lines += [_files_line(names, "edited since the run recorded it; the replay uses it as it is now (restore it from a "
                                 "copy of the run to replay the run as it was)") for names in edited.values()]
    return lines


def _environment_differences(recorded: dict[str, Any], config: Any) -> list[str]:
    now = environment(config)
    lines = []
    versions = recorded.get("versions") if isinstance(recorded.get("versions"), dict) else {}
    for name, version in versions.items():
        if now["versions"].get(name) != version:
            lines.append(f"{name} {now['versions'].get(name, 'not installed')} here, {version} in the run: losses may "
                         f"differ; install {name}=={version} to replay it exactly")
    if recorded.get("forgather_code_sha256") not in (None, now["forgather_code_sha256"]):
        lines.append("Forgather's code differs from the run's (its git.diff and git.yaml say how it was): losses may "
                     "differ; check out that code to replay it exactly")
    variables = recorded.get("variables") if isinstance(recorded.get("variables"), dict) else {}
    threads_as_run = recorded.get("torch_threads") in (None, now["torch_threads"])
    for name in sorted(set(variables) | set(now["variables"])):
        if name == "OMP_NUM_THREADS" and threads_as_run:  # torch's threads are what it set, and are as in the run
            continue
        if variables.get(name) != now["variables"].get(name):
            was = f"{name}={shlex.quote(str(variables[name]))}" if name in variables else f"{name} unset"
            lines.append(f"environment variable {name} is {now['variables'].get(name, 'unset')!r} here, {variables.get(name, 'unset')!r} "
                         f"in the run: run the replay with {was}")
    if not threads_as_run:
        lines.append(f"torch uses {now['torch_threads']} threads here, {recorded['torch_threads']} in the run (CPU sums "
                     f"may round differently): run the replay with OMP_NUM_THREADS={recorded['torch_threads']}")
    return lines


def _inputs_differences(recorded: dict[str, Any], config: Any) -> list[str]:
    lines = []
    named = _config_strings(config)
    for text, entry in recorded.items():
        if text not in named or not isinstance(entry, dict):  # an override gave other data: nothing to compare
            continue
        paths = _paths_named(text, None)
        then = entry.get("fingerprint") if isinstance(entry.get("fingerprint"), dict) else {}
        now = fingerprint(paths)
        if now != then:
            change = ("it is missing here" if not paths else
                      f"files: {then.get('files', 1)} then, {now.get('files', 1)} now" if then.get("files", 1) != now.get("files", 1)
                      else f"bytes: {then.get('size')} then, {now.get('size')} now" if then.get("size") != now.get("size")
                      else "its content differs" if "sha256" in now
                      else "written again since: same sizes, other times; too large to hash")
            lines.append(f"input {text}: not what the run read ({change}); the replay reads it as it is now: restore it "
                         f"to get the run's losses")
    return lines


@contextlib.contextmanager
def recorded_threads(run_dir: str | os.PathLike):
    """torch's intra-op threads set as the run had them meanwhile (a sweep's launcher gives each point a share of the
    cores: OMP_NUM_THREADS), so that CPU sums split, and round, as they did in the run."""
    import torch

    recorded = _read_yaml(Path(run_dir) / SNAPSHOT_DIR / ENVIRONMENT_FILE)
    threads = recorded.get("torch_threads") if isinstance(recorded, dict) else None
    before = torch.get_num_threads()
    if not isinstance(threads, int) or threads < 1 or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def replay_differences(run_dir: str | os.PathLike, config: Any) -> list[str]:
    """What differs between the run recorded in `run_dir` and a replay of `config` here, one line a thing (see the
    module docstring); [] when nothing the snapshot can tell does."""
    snapshot = Path(run_dir) / SNAPSHOT_DIR
    lines = _snapshot_differences(snapshot)
    recorded = _read_yaml(snapshot / ENVIRONMENT_FILE)
    if isinstance(recorded, dict):
        lines += _environment_differences(recorded, config)
    inputs = _read_yaml(snapshot / INPUTS_FILE)
    if isinstance(inputs, dict):
        lines += _inputs_differences(inputs, config)
    return lines


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
        from forgather.data.cache import atomic_write

        path = self.path / RESUMES_FILE
        resumes = _read_yaml(path) if path.is_file() else []
        if not isinstance(resumes, list):
            return
        resumes.append({"started": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": checkpoint,
                        "step": step, "overrides": self.overrides, "command": shlex.join(self.command)})
        atomic_write(path, lambda staging: staging.write_text(yaml.safe_dump(resumes, sort_keys=False)))

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
        (directory / ENVIRONMENT_FILE).write_text(yaml.safe_dump(environment(self.config), sort_keys=False))
        self._write_inputs(directory)
        (directory / CHECKSUMS_FILE).write_text(yaml.safe_dump(_checksums(directory), sort_keys=False))

    def _write_inputs(self, directory: Path) -> None:
        inputs = {}
        if self.config is not None:
            for text, paths in named_inputs(self.config, self.run_dir).items():
                inputs[text] = {"paths": [str(path) for path in paths], "fingerprint": fingerprint(paths)}
        (directory / INPUTS_FILE).write_text(yaml.safe_dump(inputs, sort_keys=False))

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
