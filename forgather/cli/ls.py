"""`forgather ls`: projects under a directory, with their configs and descriptions."""

from __future__ import annotations

import argparse
import os

from forgather.project import CONFIGS_DIR, find_projects, first_comment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-r", "--recursive", action="store_true", help="search subdirectories too")
    parser.add_argument("directory", nargs="?", help="where to look (default: the -p directory)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    projects = find_projects(args.directory or args.project, args.recursive)
    if not projects:
        console.print("no projects found (a project is a directory with a meta.yaml)" + ("" if args.recursive else "; try -r"))
        return 1
    for project in projects:
        where = os.path.relpath(project.root)
        console.print(f"[bold]{project.name}[/bold] ({where}): {project.description}")
        for config in project.configs():
            path = os.path.join(project.templates_dir, CONFIGS_DIR, config)
            console.print(f"    {config:<32} {first_comment(path)}")
    return 0
