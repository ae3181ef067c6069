"""Checkpoints written atomically: a crash mid-write never leaves a truncated checkpoint behind.

`AtomicCheckpointIO` is a Lightning `CheckpointIO` plugin (`Trainer(plugins=[AtomicCheckpointIO()])`): it
saves through Lightning's own `TorchCheckpointIO` to a temporary file beside the target, flushes it to disk,
and renames it over the target (os.replace is atomic on POSIX). Readers see the old file or the new one.

Every atomic writer of a run stages beside its target under a hidden name: `.<name>.tmp-<pid>` (this
plugin, the model export, the snapshot), `.<name>.old-<pid>` (the export's previous package while it is
swapped), `.<name>.partial` (job control's checkpoints), `.<name>.tmp` (the pipeline strategy's sharded
checkpoints), `.<name>.<random>.tmp` (forgather.data.cache). A writer killed mid-write leaves its staging
behind; `remove_staging` deletes it at the next start, but for an `.old` one whose `<name>` is gone (an export
killed between its renames): that is the only copy of what it replaced, and it is moved back.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

_STAGING = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|partial)(?:-(?P<pid>\d+))?$")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, temporary, storage_options)
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_staging(directory: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete the staging files and directories that killed writers left in `directory` (only those staged
    for `target`, when given); return them. One whose name ends in the pid of a live process belongs to a
    write in progress (another run exporting the same model, this process) and is kept."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue
        original = directory / match["target"]
        if match["kind"] == "old" and not original.exists() and not original.is_symlink():
            # an export killed between its two renames: the only copy of the package it replaced goes back
            os.rename(entry, original)
            warnings.warn(f"{original}: restored the exported model that an interrupted export had moved aside "
                          f"to {entry.name}", stacklevel=2)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
