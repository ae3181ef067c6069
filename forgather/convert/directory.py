"""Telling model directories apart, with the standard library only (the CLI calls this before importing torch)."""

from __future__ import annotations

import json
from pathlib import Path


def is_forgather_directory(directory: str | Path) -> bool:
    """True for a directory `forgather.models.export.save_model` wrote: its config.json holds a `model_tree`.
    A config.json that is not a JSON object is a ValueError naming the file and the line."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        values = json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config}:{error.lineno}: not valid JSON ({error.msg}); a model directory's "
                         f"config.json is a JSON object") from None
    if not isinstance(values, dict):
        raise ValueError(f"{config}: holds a JSON {type(values).__name__}, not the object a model config is")
    return "model_tree" in values
