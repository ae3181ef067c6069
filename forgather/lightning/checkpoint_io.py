"""Checkpoints written atomically: a crash mid-write never leaves a truncated checkpoint behind.

`AtomicCheckpointIO` is a Lightning `CheckpointIO` plugin (`Trainer(plugins=[AtomicCheckpointIO()])`): it
saves through Lightning's own `TorchCheckpointIO` to a temporary file beside the target, flushes it to disk,
and renames it over the target (os.replace is atomic on POSIX). Readers see the old file or the new one.

Every atomic writer of a run stages beside its target under a hidden name: `.<name>.tmp-<pid>` (this
plugin, the model export, the snapshot), `.<name>.old-<pid>` (the export's previous package while it is
swapped), `.<name>.partial` (job control's checkpoints), `.<name>.tmp-<pid of rank 0>` (the pipeline
strategy's sharded checkpoints; `.<name>.tmp` before it named them), `.<name>.<random>.tmp` (forgather.data.cache). A writer killed mid-write leaves its staging
behind; `remove_staging` deletes it at the next start, but for an `.old` one whose `<name>` is gone (an export
killed between its renames): that is the only copy of what it replaced, and it is moved back
(forgather.convert.output.restore_replaced, which every writer that swaps a model directory shares). An `.old`
without a pid is no writer's (a user's `mv last.ckpt .last.ckpt.old`): it is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

# The model export's previous package while the new one is swapped in (callbacks/model_export.py)
EXPORT_ASIDE = ".{name}.old-{pid}"
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


def remove_staging(directory: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete the staging files and directories that killed writers left in `directory` (only those staged
    for `target`, when given); return them. One whose name ends in the pid of another live process belongs to a
    write in progress (another run exporting the same model) and is kept. This process's pid is no such sign: it
    is called before this process writes there, and a restarted container gives its process the pid of the one
    killed (PID 1, or the same small number), whose export aside would stay hidden, never put back."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    from forgather.convert.output import process_alive, restore_replaced

    removed, restored = [], {}
    for entry in sorted(directory.iterdir()):
        match = _STAGING.match(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if match["kind"] == "old" and match["pid"] is None:  # no writer's: a user's copy moved aside (.last.ckpt.old)
            continue
        if match["pid"] is not None and int(match["pid"]) != os.getpid() and process_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and match["pid"] is not None:
            # An export's previous package while the new one was swapped in: put back where the export was
            # killed between its two renames (the only copy), else deleted.
            if match["target"] not in restored:  # one call handles every aside of the target
                put_back = restore_replaced(directory / match["target"], EXPORT_ASIDE, keep=False)
                restored[match["target"]] = put_back.name if put_back is not None else None
            if restored[match["target"]] != entry.name:
                removed.append(entry)
            continue
        remove_quietly(entry)
        removed.append(entry)
    return removed


def remove_quietly(path: Path) -> None:
    """Remove a checkpoint or its staging, a file or a sharded strategy's directory (a link itself, not what it
    points to); nothing there is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
