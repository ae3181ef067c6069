"""`forgather index`: a project's summary: meta.yaml, workspace, configs, template search path, model source."""

from __future__ import annotations

import argparse
import os

from forgather.cli.common import console as piped_console
from forgather.cli.common import default_config, warn_about_meta
from forgather.project import Project, config_description


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = piped_console(highlight=False, soft_wrap=True)
    project = Project.find(args.project)
    warn_about_meta(project)
    console.print(f"[bold]{escape(project.name)}[/bold]  {project.root}")
    if project.description:
        console.print(escape(project.description))
    if project.workspace_root:
        console.print(f"workspace root: {project.workspace_root}")
    console.print(f"\n[bold]configs[/bold] ({escape(project.config_prefix)}/)")
    default = default_config(project)
    for config in project.configs():
        marker = " (default)" if config == default else ""
        console.print(f"  {escape(config):<32} {escape(config_description(project.config_file(config) or ''))}{marker}")
    console.print("\n[bold]template search path[/bold]")
    for path in project.search_path(args.template_path):
        console.print(f"  {path}")
    if os.path.isdir(project.model_src):
        console.print(f"\n[bold]model source[/bold]\n  {project.model_src}")
    if project.system_path:
        console.print(f"\n[bold]system path[/bold]\n  {project.system_path}")
    return 0
