"""`forgather tb`: TensorBoard over a project's runs (outputs/ and multirun/), on localhost."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", nargs="?", help="directory of runs (default: the project's outputs and multirun)")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--dry-run", action="store_true", help="print the TensorBoard command, and exit")


def command(args: argparse.Namespace) -> list[str]:
    if args.logdir:
        logdir = os.path.abspath(args.logdir)
    else:
        roots = [os.path.join(os.path.abspath(args.project), name) for name in ("outputs", "multirun")]
        logdir = ",".join(f"{os.path.basename(r)}:{r}" for r in roots if os.path.isdir(r)) or roots[0]
    flag = "--logdir_spec" if ":" in logdir and not args.logdir else "--logdir"
    return [sys.executable, "-m", "tensorboard.main", flag, logdir, "--host", args.host, "--port", str(args.port)]


def run(args: argparse.Namespace) -> int:
    argv = command(args)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    return subprocess.call(argv)
