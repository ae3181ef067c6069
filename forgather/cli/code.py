"""`forgather code`: Python source whose construct() builds a target with plain imports."""

from __future__ import annotations

import argparse

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target to build (default: every target, as a dict)")


def run(args: argparse.Namespace) -> int:
    print(load(args).code(args.target), end="")
    return 0
