"""`forgather trefs`: the templates a config is made of, as the reference Forgather's `trefs` lists them.

The config is rendered first, so that every template it loads is known, also those named by a variable
(`-- extends base_template`). The tree follows each template's own references (extends, include, import,
read from its source, in the order written); a template that only a variable names is listed after the
tree, under the heading that says so. `--format files` (the default) prints each file once, in tree order.
"""

from __future__ import annotations

import argparse
import os

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("files", "tree"), default="files",
                        help="files: each template file once (default); tree: the reference tree, with file and line")


def template_tree(loaded) -> tuple[list[tuple[int, str]], list[str]]:
    """([(depth, template name)] depth-first from the config's template, each once; loaded templates no
    literal reference reaches)."""
    loaded.text  # render: every template the config uses is loaded, dynamic references included
    used = loaded.templates.loaded_templates()
    tree: list[tuple[int, str]] = []
    seen: set[str] = set()

    def visit(name: str, depth: int) -> None:
        if name in seen or name not in used:
            return
        seen.add(name)
        tree.append((depth, name))
        for child in loaded.templates.references(name):
            visit(child, depth + 1)

    visit(loaded.template, 0)
    return tree, sorted(used - seen)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    tree, dynamic = template_tree(loaded)

    def path(name: str) -> str:
        return os.path.relpath(loaded.templates.origin_of(name).path)

    def where(name: str) -> str:
        return f"{path(name)}:{loaded.templates.origin_of(name).line}"

    if args.format == "files":
        print("\n".join(dict.fromkeys(path(name) for name in [*(n for _, n in tree), *dynamic])))
        return 0
    for depth, name in tree:
        print(f"{'  ' * depth}{name}  ({where(name)})")
    if dynamic:
        print("loaded through a name in a variable:")
        for name in dynamic:
            print(f"  {name}  ({where(name)})")
    return 0
