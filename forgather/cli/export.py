"""`forgather export RUN_DIR`: a checkpoint of a run as a model directory, while the run trains or after.

A run exports its model when training ends; this writes any of its checkpoints (default: the newest) the same
way, into <run_dir>/exports/step-N unless --out says otherwise, for `forgather inf server -m`, `forgather
convert` or transformers. The run directory is only read. (The reference Forgather's `inf server -c` loads a
model directory's newest checkpoint; here a checkpoint is exported first.)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<experiment>/<time>)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="the checkpoint (default: the run's newest)")
    parser.add_argument("--out", metavar="DIR", help="where to write the model (default: RUN_DIR/exports/step-N)")


def run(args: argparse.Namespace) -> int:
    from forgather.run import export_checkpoint

    out = export_checkpoint(Path(args.run_dir).expanduser(), Path(args.checkpoint).expanduser() if args.checkpoint else None,
                            Path(args.out).expanduser() if args.out else None)
    print(f"exported model: {out}")
    return 0
