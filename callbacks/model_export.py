"""`ExportModel`: at the end of training, save the model as a standalone Hugging Face-format package.

On global rank 0, in `on_train_end`, the trained model is written with `forgather.models.export.save_model`
(modeling/configuration code that needs no Forgather, config.json, model.safetensors) together with the
datamodule's tokenizer, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and the
inference server can load it.

Contract:
- Atomic: the package is assembled beside `out_dir` (`.<name>.tmp-<pid>`) and swapped in by renames
  (forgather.convert.output.replace_with: the previous package goes aside as `.<name>.old-<pid>` until the new
  one is in place), so a crash or a failed write (disk full) never leaves a half-written model where a whole
  one was. At the next `setup` or export, a previous package that an export killed between its two renames
  left aside (and no `out_dir`) is put back first (`restore_replaced`), then staging left by a killed export
  is removed.
- Recorded: `<out_dir>/export.yaml` names the run directory and the global step the weights come from, so
  a model left by another run (or an earlier step) is never taken for this run's; once the package is in
  place, `<run_dir>/export.yaml` names the package and the step. A failed export raises `ExportFailed`,
  which says what `out_dir` still holds.
- Redone: when fit ends without training (a resumed run that had already finished, whose export was
  killed or failed), `on_fit_end` exports the restored weights unless the run's record says that this step
  was exported. (Not under the pipeline strategy, which gathers the model only in `on_train_end`.)
Hooks: setup, on_train_end, on_fit_end.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml

from forgather.convert.output import replace_with, restore_replaced
from forgather.data.cache import atomic_write
from forgather.errors import UserError
from forgather.lightning.checkpoint_io import EXPORT_ASIDE, remove_staging

RECORD_FILE = "export.yaml"
STAGING = ".{name}.tmp-{pid}"  # the package being written, beside out_dir
ASIDE = EXPORT_ASIDE  # the previous package while the new one is swapped in


class ExportFailed(UserError, RuntimeError):
    """The export did not complete; `out_dir` holds what it held before (said in the message)."""


def read_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The export record in a package (`{run_dir, step, name, exported}`) or a run directory
    (`{model_dir, step}`), or None."""
    try:
        record = yaml.safe_load((Path(directory) / RECORD_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return record if isinstance(record, dict) else None


def exported_step(run_dir: str | os.PathLike) -> int | None:
    """The global step whose model run `run_dir` last exported completely, or None."""
    return (read_record(run_dir) or {}).get("step")


class ExportModel(pl.Callback):
    """Args:
    out_dir: the package directory (conventionally `<project>/output_models/<name>`).
    name: the model's name (module names inside the package derive from it).
    model_config: the model's config tree (Forgather vocabulary); a partial (a model factory) is exported
        as the model it builds; scalar computations in it (`len(tokenizer)`) are folded to values.
    base_dir: where `.relative:Name` targets live (the project's model source).
    run_dir: the run the export is recorded as coming from; default `trainer.default_root_dir`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        name: str,
        model_config: Any,
        base_dir: str | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        if model_config is None:  # else found out only when training ends, with nothing exported
            raise TypeError("ExportModel(model_config=None): give the model's config tree (the config's `model`, "
                            "e.g. config.model of a loaded Forgather config), which the export writes as the model")
        self.out_dir = Path(out_dir)
        self.name = name
        self.model_config = model_config
        self.base_dir = base_dir
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self._exported = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._exported = False
        if self.run_dir is None:
            self.run_dir = Path(trainer.default_root_dir).resolve()
        if trainer.is_global_zero:
            remove_staging(self.out_dir.parent, self.out_dir.name)  # an ASIDE of a killed export goes back

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export_from(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._exported and exported_step(self.run_dir) != trainer.global_step:
            self._export_from(trainer, pl_module)

    def _export_from(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exported = True
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            self.export(pl_module.model, tokenizer, step=trainer.global_step)

    def export(self, model, tokenizer=None, step: int | None = None, record_in_run: bool = True) -> Path:
        """Write the package for `model` (trained for `step` global steps) into `out_dir`, atomically; with
        `record_in_run`, the run directory records it as the run's export (not for a checkpoint exported from
        outside the run, which may still be training)."""
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        restore_replaced(self.out_dir, ASIDE)
        staging = self.out_dir.with_name(STAGING.format(name=self.out_dir.name, pid=os.getpid()))
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write_package(staging, model, tokenizer, step)
            replace_with(staging, self.out_dir, ASIDE)
            if self.run_dir is not None and record_in_run:
                record = {"model_dir": str(self.out_dir.resolve()), "step": step}
                atomic_write(self.run_dir / RECORD_FILE, lambda path: path.write_text(yaml.safe_dump(record, sort_keys=False)))
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportFailed(
                f"exporting the model to {self.out_dir} failed ({type(error).__name__}: {error}); {self._holds()}; "
                f"once fixed, `python -m forgather.run --resume {self.run_dir}` exports it again"
            ) from error
        return self.out_dir

    def _write_package(self, staging: Path, model, tokenizer, step: int | None) -> None:
        from forgather.graph.construct import fold_scalar_calls
        from forgather.models.export import save_model

        tree = fold_scalar_calls(self.model_config, self.base_dir)
        tree.pop("_partial_", None)
        save_model(model, tree, staging, self.name, base_dir=self.base_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        record = {
            "run_dir": str(self.run_dir) if self.run_dir is not None else None,
            "step": step,
            "name": self.name,
            "exported": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        (staging / RECORD_FILE).write_text(yaml.safe_dump(record, sort_keys=False))

    def _holds(self) -> str:
        """What `out_dir` holds now, for the failure message."""
        if not self.out_dir.exists():
            return f"{self.out_dir} holds no model"
        record = read_record(self.out_dir)
        if record is None:
            return f"{self.out_dir} still holds a model with no export record (not this run's)"
        return f"{self.out_dir} still holds the model of {record.get('run_dir')} at step {record.get('step')}, not this run's"
