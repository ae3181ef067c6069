"""`forgather new PROJECT [--from EXAMPLE]`: start a project by copying an example project.

The default example is `examples/template_project` (a meta.yaml, a base template on the library's tiny
Llama, one config, an empty model_src/). The copy takes PROJECT's directory name as the `name:` in its
meta.yaml; run outputs of the example are not copied, and an existing PROJECT is never touched (nor is one
inside the example: the copy would copy itself).
Examples are found beside the package (`forgather/../examples`): in a source checkout or an editable
install. An installed wheel does not ship them; `--from DIR` then copies any project directory.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from forgather.data.cache import file_in_the_way
from forgather.errors import UserError
from forgather.project import META_FILE, Project, find_projects

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
DEFAULT_EXAMPLE = "template_project"
# What a project accumulates by being used, rather than what defines it.
_NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "multirun", "output_models", "lightning_logs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="PROJECT", help="directory to create; its name becomes the project's name")
    parser.add_argument(
        "--from", dest="example", default=DEFAULT_EXAMPLE, metavar="EXAMPLE",
        help=f"example to copy, relative to examples/ (default {DEFAULT_EXAMPLE}), or any project directory",
    )


def run(args: argparse.Namespace) -> int:
    try:
        project = create_project(args.directory, args.example)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = project.meta.get("default_config", "CONFIG")
    steps = {
        f"cd {shlex.quote(args.directory)}": "",
        "forgather ls": "its configs",
        f"forgather -t {config} pp": "the rendered config",
        f"forgather -t {config} train": "train it",
    }
    width = max(map(len, steps))
    print(f"created project {project.name!r} in {project.root}\nnext:")
    for command, why in steps.items():
        print(f"  {command:<{width}}  # {why}" if why else f"  {command}")
    return 0


def create_project(directory: str | Path, example: str = DEFAULT_EXAMPLE, examples_dir: Path = EXAMPLES_DIR) -> Project:
    """Copy `example` to `directory` (which must not exist) and name the project after the directory."""
    source = find_example(example, examples_dir)
    destination = Path(directory).resolve()
    if destination.exists():
        raise FileExistsError(f"{destination} already exists; `forgather new` never overwrites: choose a new directory")
    blocking = file_in_the_way(destination)
    if blocking is not None:
        raise UserError(f"{blocking} is a file, so {destination} cannot be created in it; choose a directory elsewhere")
    if destination.is_relative_to(source.resolve()):  # the copy would be copied into itself, without end
        raise UserError(f"{destination} is inside {source.resolve()}, the project it copies; choose a directory outside it")
    shutil.copytree(source, destination, ignore=_NOT_COPIED)
    meta = destination / META_FILE
    meta.write_text(with_name(meta.read_text(encoding="utf-8"), destination.name), encoding="utf-8")
    return Project.load(str(destination))


def find_example(example: str, examples_dir: Path = EXAMPLES_DIR) -> Path:
    """The project directory `example` names: under examples/, or a path."""
    for candidate in (examples_dir / example, Path(example)):
        if (candidate / META_FILE).is_file():
            return candidate
    if not examples_dir.is_dir():
        raise FileNotFoundError(
            f"no examples directory at {examples_dir}: the examples come with a source checkout, not with an "
            "installed wheel; pass --from DIR with a project directory to copy"
        )
    found = sorted(Path(p.root).relative_to(examples_dir).as_posix() for p in find_projects(str(examples_dir), recursive=True))
    raise FileNotFoundError(f"no example project {example!r}; the examples are: {', '.join(found)}")


def with_name(meta_text: str, name: str) -> str:
    """meta.yaml text with its `name:` set to `name`, every other line (and comment) kept. meta.yaml is a
    template: a name holding Jinja's delimiters (`{{`, `{%`, `{#`) is written as a string expression."""
    line = yaml.safe_dump({"name": name}, default_flow_style=False, allow_unicode=True).strip()
    if re.search(r"\{[{%#]", line):
        line = "name: {{ %s | tojson }}" % json.dumps(name)
    replaced, count = re.subn(r"^name:.*$", lambda _: line, meta_text, count=1, flags=re.M)
    return replaced if count else f"{line}\n{meta_text}"
