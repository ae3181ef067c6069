"""`forgather train`: the runner (`python -m forgather.run`) for a config of the current project.

    forgather -t tiny.yaml train lr=1e-3   ==  python -m forgather.run -p . --outputs . +experiment=tiny lr=1e-3
Runs and exported models go into the project (outputs/, multirun/, output_models/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import PurePosixPath


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="overrides, as for python -m forgather.run")
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep over comma lists, range(), choice(), glob()")
    parser.add_argument("-d", "--devices", help="GPU indices, e.g. 0,1")
    parser.add_argument("--dry-run", action="store_true", help="print the launch command, and exit")
    parser.add_argument("--cfg", action="store_true", help="print the config as it would run, and exit")


def run_arguments(args: argparse.Namespace) -> list[str]:
    """The `python -m forgather.run` arguments this command stands for."""
    argv = ["-p", args.project, "--outputs", args.project]
    for path in args.template_path:
        argv += ["--template-path", path]
    if args.config:
        argv.append(f"+experiment={PurePosixPath(args.config).with_suffix('').as_posix()}")
    for flag in ("multirun", "dry_run", "cfg"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-") if flag != "multirun" else "-m")
    if args.devices:
        argv += ["-d", args.devices]
    if getattr(args, "dynamic", None):
        argv += ["--dynamic-args", json.dumps(args.dynamic)]
    return argv + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    from forgather.run import main

    return main(run_arguments(args))
