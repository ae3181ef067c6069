"""What the subcommands share: loading the chosen config, with the values of the arguments it declares in
its `dynamic_args`; the project's default config and what in its meta.yaml looks mistaken. (Errors are
reported by forgather.errors.report.)"""

from __future__ import annotations

import argparse
from typing import Any
import os
import re
import sys

from forgather.errors import did_you_mean
from forgather.project import META_FILE, LoadedConfig, Project, add_dynamic_arguments


def load(args: argparse.Namespace) -> LoadedConfig:
    project = Project.find(args.project)
    return project.load_config(args.config, tuple(args.template_path), **getattr(args, "dynamic", {}))


def declare_config_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Add the arguments the chosen config declares (its `dynamic_args`) to a subcommand's parser."""
    return add_dynamic_arguments(parser, load(args))



def chosen_target(loaded: LoadedConfig, target: str | None) -> str | None:
    """The target a command builds: the one given; else, as in the reference Forgather, `main` when the config
    has one; else None (every target)."""
    if target is None and "main" in loaded.graph.targets:
        return "main"
    return target


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--debug", action="store_true",
                        help="first print each template the config loads, as Jinja2 reads it (line syntax expanded), "
                             "with line numbers, as the reference Forgather's -d does")


def render_showing_templates(loaded: LoadedConfig) -> str:
    """The rendered YAML, after printing every template the rendering loaded (also when it fails: that is when
    they are wanted), each under a banner with its name and its lines numbered."""
    from forgather.template.preprocess import preprocess

    try:
        return loaded.text
    finally:
        for name in loaded.templates.loaded_in_order():
            print(f"{' ' + name + ' ':-^80}")
            for number, line in enumerate(preprocess(loaded.templates.source(name)).splitlines(), 1):
                print(f"{number:>5}  {line}")


def default_config(project: Project) -> str | None:
    """The config, as `project.configs()` names it, that the project uses when none is chosen; None when there
    is none (meta.yaml's default_config may name it without its suffix, or with its config prefix)."""
    if project.default_config is None:
        return None
    name = project.config_template(project.default_config).removeprefix(f"{project.config_prefix}/")
    return name if name in project.configs() else None


def warn_about_meta(project: Project) -> None:
    """Print, as a warning, a default_config in the project's meta.yaml that names no config of the project (a
    misspelled meta.yaml key is warned about where meta.yaml is read)."""
    given = project.meta.get("default_config")
    if given and default_config(project) is None:
        configs = project.configs()
        hint = did_you_mean(given, configs) or f"the configs are: {', '.join(configs) or 'none'}"
        print(f"warning: {_meta_line(project)}: default_config {given!r} is not a config of the project; {hint}",
              file=sys.stderr)


def _meta_line(project: Project) -> str:
    """`<project>/meta.yaml:LINE` of the line that sets default_config (meta.yaml as written: it is a template)."""
    path = os.path.join(project.root, META_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):
        return path
    found = re.search(r"^\s*default_config\s*:", text, re.M)
    if found is None:
        return path
    return f"{path}:{text.count(chr(10), 0, found.start()) + 1}"


def console(**options: Any) -> Any:
    """A rich Console for a printing command: a reader that closes the pipe (`forgather ls | head -1`) raises
    BrokenPipeError, which main turns into a quiet success; rich's own handling exits with 1."""
    from rich.console import Console

    class _PipedConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _PipedConsole(**options)
