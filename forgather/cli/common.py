"""What the subcommands share: loading the chosen config, with the values of the arguments it declares in
its `dynamic_args`. (Errors are reported by forgather.errors.report.)"""

from __future__ import annotations

import argparse

from forgather.project import LoadedConfig, Project, add_dynamic_arguments


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
