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
