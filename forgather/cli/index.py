"""`forgather index`: a project's summary: meta.yaml, configs, template search path, model source."""

from __future__ import annotations

import argparse
import os

from forgather.project import CONFIGS_DIR, Project, first_comment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    project = Project.load(args.project)
    console.print(f"[bold]{project.name}[/bold]  {project.root}")
    if project.description:
        console.print(project.description)
    console.print("\n[bold]configs[/bold]")
    for config in project.configs():
        marker = " (default)" if config == project.meta.get("default_config") else ""
        console.print(f"  {config:<32} {first_comment(os.path.join(project.templates_dir, CONFIGS_DIR, config))}{marker}")
    console.print("\n[bold]template search path[/bold]")
    for path in project.search_path(args.template_path):
        console.print(f"  {path}")
    if os.path.isdir(project.model_src):
        console.print(f"\n[bold]model source[/bold]\n  {project.model_src}")
    return 0
