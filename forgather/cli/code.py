"""`forgather code`: Python source whose construct() builds a target with plain imports."""

from __future__ import annotations

import argparse

from forgather.cli.common import chosen_target, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target to build (default: main, if the config has one; else every target, as a dict)")


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    print(loaded.code(chosen_target(loaded, args.target)), end="")
    return 0
