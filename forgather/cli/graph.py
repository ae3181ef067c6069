"""`forgather graph`: the node graph, as YAML in Forgather's tag syntax or as Python code."""

from __future__ import annotations

import argparse

from forgather.cli.common import add_debug_argument, load, render_showing_templates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("yaml", "python", "repr", "none"), default="yaml",
                        help="yaml (default): Forgather's tag syntax; python: code that builds it; repr: the node "
                             "objects; none: only check that the graph loads (with -d: its templates)")
    add_debug_argument(parser)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    if args.debug:
        render_showing_templates(loaded)
    if args.format == "python":
        print(loaded.code(), end="")
    elif args.format == "repr":
        print(repr(loaded.graph))
    elif args.format == "none":
        loaded.graph  # parsed: a mistake is reported as for any other format
    else:
        from forgather.graph import dump_graph

        print(dump_graph(loaded.graph), end="")
    return 0
