"""`forgather tlist`: every template on the project's search path, as the reference Forgather's `tlist`.

Each name a config can extend or include, with the file (and, for a section of a split file, the line) it
comes from (`--format names`); a name that an earlier search-path directory also has is listed once, from where
it resolves. By default (`--format files`, as the reference's) each file is printed once, a path a line. A YAML file that cannot be read as a template (not UTF-8, a
sub-template named twice) is left out with a warning naming its line; a stray binary file, silently.
"""

from __future__ import annotations

import argparse
import os
import sys

import jinja2

from forgather.project import Project
from forgather.template import TemplateEnvironment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # files is the default, as in the reference: its guide pipes it, `forgather tlist | xargs grep PATTERN`.
    parser.add_argument("--format", choices=("names", "files", "md"), default="files",
                        help="files: each template file once, a path a line (default); names: each template name "
                             "with its file; md: the names as a Markdown list linking their files")


def _is_template(name: str) -> bool:
    """Template files, not the Python files and caches a template directory may also hold."""
    return not name.endswith((".py", ".pyc")) and "__pycache__" not in name


def _is_named_as_template(name: str) -> bool:
    """A file that is meant to be a template: a YAML file, not hidden."""
    return name.endswith((".yaml", ".yml")) and not os.path.basename(name).startswith(".")


def run(args: argparse.Namespace) -> int:
    project = Project.find(args.project)
    templates = TemplateEnvironment(project.search_path(args.template_path))
    unreadable = set()
    for name in templates.list_templates():  # loading a file names its sections (`#---- name ----`) and origins
        if _is_template(name):
            try:
                templates.source(name)
            except (UnicodeDecodeError, jinja2.TemplateSyntaxError) as error:
                unreadable.add(name)
                if _is_named_as_template(name):  # not a stray binary file (.DS_Store, a swap file): say why
                    where = f"{error.filename}:{error.lineno}" if isinstance(error, jinja2.TemplateSyntaxError) else name
                    print(f"warning: {where}: not listed: {getattr(error, 'message', error)}", file=sys.stderr)
    listed = {*templates.list_templates(), *templates.loaded_templates()}
    names = sorted(n for n in listed if _is_template(n) and n not in unreadable)
    if args.format == "files":
        print("\n".join(dict.fromkeys(os.path.relpath(templates.origin_of(name).path) for name in names)))
        return 0
    if args.format == "md":
        for name in names:
            origin = templates.origin_of(name)
            line = f" (line {origin.line})" if origin.line > 1 else ""
            print(f"- [{name}]({os.path.relpath(origin.path)}){line}")
        return 0
    width = max((len(name) for name in names), default=0)
    for name in names:
        origin = templates.origin_of(name)
        line = f":{origin.line}" if origin.line > 1 else ""
        print(f"{name:<{width}}  {os.path.relpath(origin.path)}{line}")
    return 0
