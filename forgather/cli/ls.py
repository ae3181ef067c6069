"""`forgather ls`: projects under a directory, with their configs and descriptions.

As the reference Forgather's: `ls` lists the project the -p directory is in (the nearest one at or above it),
`ls -r` every project below it, and `ls DIR...` (with -r: below each) the projects given. A project whose
meta.yaml fails to load is listed with its error (file:line), and the listing goes on. A run's snapshot/ holds
a meta.yaml too (the run's record): it is not listed as a project."""

from __future__ import annotations

import argparse
import os
import sys

from forgather.cli.common import console as piped_console
from forgather.cli.common import default_config, warn_about_meta
from forgather.project import Project, config_description, enclosing_project, project_dirs
from forgather.template import TemplateError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-r", "--recursive", action="store_true", help="search subdirectories too")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="render every config too, and name those that fail with their error (as the reference "
                             "Forgather's -d)")
    parser.add_argument("directories", nargs="*", metavar="directory",
                        help="where to look (default: the project the -p directory is in; with -r, the -p directory)")


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = piped_console(highlight=False, soft_wrap=True)
    for given in args.directories:
        if not os.path.isdir(given):  # os.walk takes a missing one for an empty one
            what = "a file, not a directory" if os.path.exists(given) else "no such directory"
            print(f"error: {given}: {what}; give the directory to look for projects in", file=sys.stderr)
            return 2
    roots = args.directories or [args.project if args.recursive else enclosing_project(args.project) or args.project]
    found = [d for root in roots for d in project_dirs(root, args.recursive) if not _is_run_snapshot(d)]
    directories = list(dict.fromkeys(found))  # `ls -r a a/b` lists a project once
    if not directories:
        console.print("no projects found (a project is a directory with a meta.yaml)" + ("" if args.recursive else "; try -r"))
        return 1
    failed = 0
    for directory in directories:
        where = os.path.relpath(directory)
        try:
            project = Project.load(directory)
        except TemplateError as error:
            failed += 1
            console.print(f"[bold red]{escape(where)}[/bold red]: error: {escape(str(error))}")
            continue
        warn_about_meta(project)
        console.print(f"[bold]{escape(project.name)}[/bold] ({escape(where)}): {escape(project.description)}")
        default = default_config(project)
        for config in project.configs():
            marker = "*" if config == default else " "
            console.print(f"  {marker} {escape(config):<32} {escape(config_description(project.config_file(config) or ''))}")
            if args.debug:
                problem = _render_error(project, config)
                if problem:
                    failed += 1
                    console.print(f"      [bold red]error[/bold red]: {escape(problem)}")
    return 2 if failed else 0


def _is_run_snapshot(directory: str) -> bool:
    """A run's snapshot/ (callbacks/snapshot.py) holds a meta.yaml of its own: the run's record, not a project."""
    return os.path.basename(directory) == "snapshot" and os.path.isfile(os.path.join(directory, "command.txt"))


def _render_error(project: Project, config: str) -> str | None:
    """Why `config` does not render and parse into a node graph, in one line (the first of the error report's);
    None when it does. A bug is raised, as `forgather` reports it."""
    from forgather.errors import describe

    try:
        project.load_config(config).graph
    except Exception as error:
        line = describe(error)
        if line is None:
            raise
        return line.splitlines()[0]
    return None
