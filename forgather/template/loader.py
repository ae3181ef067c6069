"""Template loading over a search path, with files split into named sub-templates.

A line `#---- name ----` (a `#`, three or more dashes, a name of word characters, `.` and `/`, three or
more dashes; spaces allowed between them) ends the template above it and starts a sub-template called
`name`, loadable by that name once its file has been loaded. So one file can hold a config and the helper
templates it `-- include`s, each extending its own base. As in the reference Forgather, the separator is
found in the file's text with the newline on both sides: the line above it loses its newline (the
template above ends there), a separator on the first line of a file is not one, and neither is one right
below another (that newline belongs to the first).

The loader remembers where every template it served comes from (file and line offset), so that errors
can name the author's file and line, also inside a sub-template. A file holding a NUL byte is a syntax
error at that byte's line: templates are text, and YAML would refuse the byte later, far from its file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import jinja2

_SEPARATOR = re.compile(r"\n#\s*-{3,}\s*([\w./]+)\s*-{3,}\n")


@dataclass(frozen=True)
class Origin:
    """Where a template's text starts: `path`, and how many lines of the file precede it; `name` is the
    template's name (a sub-template's own name)."""

    path: str
    line_offset: int = 0
    name: str = ""


def split_sections(source: str, main_name: str) -> list[tuple[str, str, int]]:
    """Split a file's text into (name, text, line offset) sections; the first is named `main_name`."""
    sections: list[tuple[str, str, int]] = []
    name, start = main_name, 0
    for separator in _SEPARATOR.finditer(source):
        sections.append((name, source[start : separator.start()], source.count("\n", 0, start)))
        name, start = separator.group(1), separator.end()
    sections.append((name, source[start:], source.count("\n", 0, start)))
    return sections


class SplitFileLoader(jinja2.FileSystemLoader):
    """A FileSystemLoader whose files may hold several `#---- name ----` sub-templates."""

    def __init__(self, search_path: list[str]):
        super().__init__([os.path.abspath(p) for p in search_path], followlinks=True)
        self.origins: dict[str, Origin] = {}
        # Jinja's rewritten tracebacks keep a template's filename but not its name: sub-templates get a
        # filename of their own ("file.yaml::name") so that frames map back to the right section.
        self.origins_by_filename: dict[str, Origin] = {}
        self._sections: dict[str, tuple[str, str, Callable[[], bool]]] = {}

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        if template in self._sections:
            return self._sections[template]
        source, filename, uptodate = super().get_source(environment, template)
        filename = os.path.abspath(filename)
        if "\0" in source:
            self.origins[template] = Origin(filename, 0, template)
            line = source.count("\n", 0, source.index("\0")) + 1
            raise jinja2.TemplateSyntaxError(
                "a NUL byte (\\x00) in the template: templates are text; remove it (is this a binary file?)",
                line, template, filename,
            )
        main = None
        for name, text, offset in split_sections(source, template):
            origin = Origin(filename, offset, name)
            section_filename = filename if name == template else f"{filename}::{name}"
            self.origins[name] = self.origins_by_filename[section_filename] = origin
            entry = (text, section_filename, uptodate)
            if main is None:
                main = entry
            else:
                self._sections[name] = entry
        assert main is not None
        return main

    def origin(self, name: str) -> Origin | None:
        return self.origins.get(name)
