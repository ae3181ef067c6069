"""`ExportModel`: at the end of training, save the model as a standalone Hugging Face-format package.

On global rank 0, in `on_train_end`, the trained model is written with `forgather.models.export.save_model`
(modeling/configuration code that needs no Forgather, config.json, model.safetensors) together with the
datamodule's tokenizer, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and the
inference server can load it. The package is assembled beside `out_dir` and swapped in by renames, so a
crash never leaves a half-written model where a whole one was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class ExportModel(pl.Callback):
    """Args:
    out_dir: the package directory (conventionally `<project>/output_models/<name>`).
    name: the model's name (module names inside the package derive from it).
    model_config: the model's config tree (Forgather vocabulary); a partial (a model factory) is exported
        as the model it builds; scalar computations in it (`len(tokenizer)`) are folded to values.
    base_dir: where `.relative:Name` targets live (the project's model source).
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, model_config: Any, base_dir: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.model_config = model_config
        self.base_dir = base_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            self.export(pl_module.model, tokenizer)

    def export(self, model, tokenizer=None) -> Path:
        from forgather.graph.construct import fold_scalar_calls
        from forgather.models.export import save_model

        tree = fold_scalar_calls(self.model_config, self.base_dir)
        tree.pop("_partial_", None)
        staging = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        save_model(model, tree, staging, self.name, base_dir=self.base_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        previous = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
        if self.out_dir.exists():
            os.replace(self.out_dir, previous)
        os.replace(staging, self.out_dir)
        shutil.rmtree(previous, ignore_errors=True)
        return self.out_dir
