"""`forgather trefs`: the templates a config is made of, as the reference Forgather's `trefs` lists them.

The config is rendered first, so that every template it loads is known, also those named by a variable
(`-- extends base_template`). The tree follows each template's own references (extends, include, import,
read from its source, in the order written); a template that only a variable names is listed after the
tree, under the heading that says so. `--format files` (the default) prints each file once, in tree order.
"""

from __future__ import annotations

import argparse
import json
import os

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("files", "tree", "md", "dot", "svg"), default="files",
                        help="files: each template file once (default); tree: the reference tree, with file and "
                             "line; md: the tree as a Markdown list linking the files; dot: the references as a "
                             "Graphviz graph; svg: that graph drawn by Graphviz's dot (-o trefs.svg)")


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
    if args.format == "md":
        for depth, name in tree:
            print(f"{'  ' * depth}- [{name}]({path(name)}) (line {loaded.templates.origin_of(name).line})")
        for name in dynamic:
            print(f"- [{name}]({path(name)}) (loaded through a name in a variable)")
        return 0
    if args.format == "dot":
        print(_dot(loaded, [name for _, name in tree], dynamic, where))
        return 0
    if args.format == "svg":
        print(_svg(_dot(loaded, [name for _, name in tree], dynamic, where)), end="")
        return 0
    for depth, name in tree:
        print(f"{'  ' * depth}{name}  ({where(name)})")
    if dynamic:
        print("loaded through a name in a variable:")
        for name in dynamic:
            print(f"  {name}  ({where(name)})")
    return 0


def _dot(loaded, names: list[str], dynamic: list[str], where) -> str:
    """A Graphviz digraph: each template a box labelled with its file and line, an edge for each reference
    (extends, include, import), the templates only a variable names dashed."""
    used = set(names) | set(dynamic)
    lines = ["digraph trefs {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
    for name in [*names, *dynamic]:
        style = ", style=dashed" if name in dynamic else ""
        lines.append(f"  {json.dumps(name)} [label={json.dumps(name + chr(10) + where(name))}{style}];")
    for name in names:
        lines += [f"  {json.dumps(name)} -> {json.dumps(child)};"
                  for child in dict.fromkeys(loaded.templates.references(name)) if child in used]
    return "\n".join([*lines, "}"])


def _svg(dot: str) -> str:
    """`dot` drawn as SVG by Graphviz's `dot` program, as the reference's --format svg does."""
    import shutil
    import subprocess

    from forgather.errors import UserError

    program = shutil.which("dot")
    if program is None:
        raise UserError("trefs --format svg: Graphviz's `dot` program is not installed; install Graphviz, or print "
                        "the graph with --format dot")
    drawn = subprocess.run([program, "-Tsvg"], input=dot, capture_output=True, text=True)
    if drawn.returncode != 0:
        raise UserError(f"trefs --format svg: dot failed: {drawn.stderr.strip()}")
    return drawn.stdout
