"""`forgather targets`: the constructable targets of a config."""

from __future__ import annotations

import argparse

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    for target in load(args).graph.targets:
        print(target)
    return 0
