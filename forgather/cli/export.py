"""`forgather export RUN_DIR`: a checkpoint of a run as a model directory, while the run trains or after.

A run exports its model when training ends; this writes any of its checkpoints (default: the newest) the same
way, into <run_dir>/exports/step-N unless --out says otherwise, for `forgather inf server -m`, `forgather
convert` or transformers. The run directory is only read. An existing --out is refused unless --overwrite, and
one that is the run, its checkpoint, a directory holding either, or an existing part of the run (but for its
exports/) is refused always (forgather.convert.output.check_destination). A previous --out that an export
killed between its two renames left aside is put back first (and so refused without --overwrite); staging left
beside it by a killed export is removed. (The reference Forgather's `inf server -c` loads a model directory's newest
checkpoint; here a checkpoint is exported first.)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<experiment>/<time>)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="the checkpoint (default: the run's newest)")
    parser.add_argument("--out", metavar="DIR", help="where to write the model (default: RUN_DIR/exports/step-N)")
    parser.add_argument("--overwrite", "--force", action="store_true", help="replace --out if it exists")


def check_out(out: Path, run_dir: Path, checkpoint: Path | None, overwrite: bool) -> None:
    """Refuse an --out whose replacement would lose something (see the module docstring)."""
    from forgather.callbacks.model_export import ASIDE, STAGING
    from forgather.convert.output import DestinationExists, check_destination, remove_abandoned, restore_replaced
    from forgather.run import EXPORTS_DIR

    if restore_replaced(out, ASIDE) is not None:  # before the check: a restored model is one only --overwrite replaces
        remove_abandoned(out, STAGING)  # the killed export's staging, also when the check refuses
    sources = [run_dir] if checkpoint is None else [run_dir, checkpoint]
    out = check_destination(out, overwrite, sources, reading="the run being exported")
    exports = (run_dir / EXPORTS_DIR).resolve()
    inside = out.resolve().is_relative_to(run_dir.resolve()) and not out.resolve().is_relative_to(exports)
    if inside and out.exists():
        raise DestinationExists(f"{out}: part of the run {run_dir}, --overwrite or not; choose a new destination")
    remove_abandoned(out, STAGING)


def run(args: argparse.Namespace) -> int:
    from forgather.run import export_checkpoint

    run_dir = Path(args.run_dir).expanduser()
    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else None
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        check_out(out, run_dir, checkpoint, args.overwrite)
    print(f"exported model: {export_checkpoint(run_dir, checkpoint, out)}")
    return 0
