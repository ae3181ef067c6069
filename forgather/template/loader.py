"""Template loading over a search path, with files split into named sub-templates.

A line `#---- name ----` (a `#`, three or more dashes, a name of word characters, `.` and `/`, three or
more dashes; spaces allowed between them) ends the template above it and starts a sub-template called
`name`, loadable by that name once its file has been loaded. So one file can hold a config and the helper
templates it `-- include`s, each extending its own base. As in the reference Forgather, the separator is
found in the file's text with the newline on both sides: the line above it loses its newline (the
template above ends there), a separator on the first line of a file is not one, and neither is one right
below another (that newline belongs to the first).

The loader remembers where every template it served comes from (file and line offset), so that errors
can name the author's file and line, also inside a sub-template. A file holding a NUL byte, or bytes that
are not UTF-8, is a syntax error at that byte's line: templates are text, and YAML would refuse the byte
later, far from its file. So is a file naming one sub-template twice (the second would silently win), and a
template asked for by something other than a name (`-- extends 5`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import jinja2
from jinja2.loaders import split_template_path

_SEPARATOR = re.compile(r"\n#\s*-{3,}\s*([\w./]+)\s*-{3,}\n")


class TemplateNameError(TypeError):
    """A template asked for by something other than a name (`-- extends 5`); the renderer names its line."""

    def __init__(self, value: object):
        super().__init__(f"extends, include and import take a template name (a string), not {value!r} "
                         f"({type(value).__name__}); quote it: -- extends 'name.yaml'")


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
        if not isinstance(template, str):  # `-- extends 5`: else an AttributeError deep in Jinja
            raise TemplateNameError(template)
        if template in self._sections:
            return self._sections[template]
        try:
            source, filename, uptodate = super().get_source(environment, template)
        except UnicodeDecodeError as error:
            filename = self._file_of(template)
            line = error.object.count(b"\n", 0, error.start) + 1
            raise self._file_error(template, filename, line, f"not UTF-8 text (byte 0x{error.object[error.start]:02x}); save it as UTF-8") from None
        filename = os.path.abspath(filename)
        if "\0" in source:
            line = source.count("\n", 0, source.index("\0")) + 1
            raise self._file_error(template, filename, line, "a NUL byte (\\x00) in the template: templates are text; remove it (is this a binary file?)")
        main = None
        seen: dict[str, int] = {}  # sub-template name -> the line of its separator
        for name, text, offset in split_sections(source, template):
            if name in seen and name != template:
                raise self._file_error(template, filename, offset,
                                       f"sub-template {name!r} is named twice, at lines {seen[name]} and {offset}; rename one of them")
            seen[name] = offset
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

    def _file_of(self, template: str) -> str:
        """The file the search path gives `template` (as FileSystemLoader finds it)."""
        pieces = split_template_path(template)
        found = (os.path.join(directory, *pieces) for directory in self.searchpath)
        return os.path.abspath(next(path for path in found if os.path.isfile(path)))

    def _file_error(self, template: str, filename: str, line: int, message: str) -> jinja2.TemplateSyntaxError:
        """A syntax error at `line` of the file of `template`, found before Jinja parses it."""
        self.origins[template] = Origin(filename, 0, template)
        return jinja2.TemplateSyntaxError(message, line, template, filename)

    def origin(self, name: str) -> Origin | None:
        return self.origins.get(name)
