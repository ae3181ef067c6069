"""`forgather construct`: build a target (or every target) and print what was built."""

from __future__ import annotations

import argparse

from forgather.cli.common import chosen_target, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target to build (default: main, if the config has one; else every target)")
    parser.add_argument("--call", action="store_true", help="call the constructed object (e.g. a partial) and print the result")


def run(args: argparse.Namespace) -> int:
    from rich.pretty import pprint

    loaded = load(args)
    result = loaded.construct(chosen_target(loaded, args.target))
    if args.call:
        result = result()
    pprint(result, expand_all=False)
    return 0
