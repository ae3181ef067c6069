"""`forgather pp`: the template stage's output, the rendered YAML (or, with --jinja, the Jinja source)."""

from __future__ import annotations

import argparse

from forgather.cli.common import add_debug_argument, load, render_showing_templates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jinja", action="store_true", help="print the config's template as plain Jinja2 (line syntax expanded)")
    add_debug_argument(parser)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    if args.debug:
        render_showing_templates(loaded)
    if args.jinja:
        from forgather.template.preprocess import preprocess

        text = preprocess(loaded.templates.source(loaded.template))
    else:
        text = loaded.text
    # As in the reference, rendering drops the template's final newline; the terminal still gets one.
    print(text, end="" if text.endswith("\n") else "\n")
    return 0
