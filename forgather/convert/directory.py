"""Telling model directories apart, with the standard library only (the CLI calls this before importing torch)."""

from __future__ import annotations

import json
from pathlib import Path


def is_forgather_directory(directory: str | Path) -> bool:
    """True for a directory `forgather.models.export.save_model` wrote: its config.json holds a `model_tree`."""
    config = Path(directory) / "config.json"
    return config.is_file() and "model_tree" in json.loads(config.read_text())
