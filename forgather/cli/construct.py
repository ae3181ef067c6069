"""`forgather construct`: build a target (or every target) and print what was built."""

from __future__ import annotations

import argparse
from typing import Any

from forgather.cli.common import chosen_target, console, load
from forgather.project import LoadedConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target to build (default: main, if the config has one; else every target)")
    parser.add_argument("--call", action="store_true", help="call the constructed object (e.g. a partial) and print the result")


def run(args: argparse.Namespace) -> int:
    from rich.pretty import pprint

    loaded = load(args)
    target = chosen_target(loaded, args.target)
    result = loaded.construct(target)
    if args.call:
        result = _called(loaded, target, result)
    pprint(result, console=console(), expand_all=False)
    return 0


def _called(loaded: LoadedConfig, target: str | None, built: Any) -> Any:
    """What calling the built object returns; a mistake (not callable, or the call raises) is located at the
    target's line, as a construction error is."""
    name = target or "every target"
    line = loaded.line_of(target) if target else None
    if not callable(built):
        raise loaded.located(f"--call: {name} built a {type(built).__name__}, which is not callable; leave out --call "
                             f"(it is for a target that builds a function or a partial)", line)
    try:
        return built()
    except Exception as error:
        raise loaded.located(f"--call: calling {name} raised {type(error).__name__}: {error}", line) from error
