"""`forgather graph`: the node graph, as YAML in Forgather's tag syntax or as Python code."""

from __future__ import annotations

import argparse
from typing import Any

from forgather.cli.common import add_debug_argument, load, render_showing_templates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("yaml", "python", "repr", "fconfig", "none"), default="yaml",
                        help="yaml (default): Forgather's tag syntax; python: code that builds it; repr: the node "
                             "objects; fconfig: the node objects indented, keys sorted, a shared node written once "
                             "(the reference's layout); none: only check that the graph loads (with -d: its templates)")
    add_debug_argument(parser)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    if args.debug:
        render_showing_templates(loaded)
    if args.format == "python":
        print(loaded.code(), end="")
    elif args.format == "repr":
        print(repr(loaded.graph))
    elif args.format == "fconfig":
        print(fconfig(loaded.graph.nodes, set()))
    elif args.format == "none":
        loaded.graph  # parsed: a mistake is reported as for any other format
    else:
        from forgather.graph import dump_graph

        print(dump_graph(loaded.graph), end="")
    return 0


def fconfig(value: Any, seen: set[int]) -> str:
    """The reference Forgather's `fconfig` layout of a graph value: `key: value` (sorted keys), `- item`, a call
    as `KIND 'name' target` over its indented arguments, and a node met before as `... elided`."""
    from pprint import pformat

    from forgather.graph.nodes import CallNode, VarNode

    def indent(block: str) -> str:
        return "\n".join("  " + line for line in block.split("\n"))

    if isinstance(value, (dict, list, tuple)) and not value:
        return pformat(value)
    if isinstance(value, dict):
        lines = []
        for key, item in sorted(value.items(), key=lambda pair: str(pair[0])):
            text = fconfig(item, seen)
            block = "\n" in text or len(text) > 80 or (isinstance(item, dict) and bool(item))
            lines.append(f"{key}:\n{indent(text)}" if block else f"{key}: {text}")
        return "\n".join(lines)
    if isinstance(value, (list, tuple)):
        return "\n".join("- " + fconfig(item, seen).replace("\n", "\n  ") for item in value)
    if isinstance(value, VarNode):
        return f"var {value.name}={value.default!r}"
    if isinstance(value, CallNode):
        head = f"{value.kind} {value.name!r} {value.target}"
        if id(value) in seen:
            return head + " elided ..."
        seen.add(id(value))
        parts = [fconfig(part, seen) for part in (value.args, value.kwargs) if part]
        return "\n".join([head, *(indent(part) for part in parts)])
    return pformat(value)
