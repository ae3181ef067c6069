"""The Jinja2 environment of the template stage, and rendering with errors that name the author's lines.

`TemplateEnvironment(search_path)` renders a template by name to YAML text. Every failure (syntax,
undefined variable, missing template, an exception inside an expression) becomes a `TemplateError`
naming the original file and line (not the preprocessed text, and inside split files the line of the
file) plus the chain of extends/includes that led there.

`locate(name, line)` maps a line of the rendered output back to the template line that produced it. It
renders once more with a marker comment after every plain text line (the markers never reach the real
output, so they cannot change its meaning); only error paths pay for it.
"""

from __future__ import annotations

import difflib
import re
import sys
import traceback
from types import TracebackType
from typing import Any

import jinja2

from forgather.template import globals as template_globals
from forgather.template.errors import SourceLocation, TemplateError
from forgather.template.loader import SplitFileLoader
from forgather.template.preprocess import LineSyntax, preprocess

_MARKER = re.compile(r" #@@(\d+):(\d+)$")
_TAG = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}


def _markable(line: str, inside: str | None) -> tuple[bool, str | None]:
    """Whether a marker may follow this preprocessed line, and the open-tag state after it."""
    start_inside = inside
    for token in _TAG.findall(line):
        if inside is None and token in _CLOSERS:
            inside = token
        elif inside is not None and token == _CLOSERS[inside]:
            inside = None
    tail = line.rstrip()
    eats_newline = tail.endswith(("%}", "#}", "-}}"))
    return start_inside is None and inside is None and bool(tail) and not eats_newline, inside


class _MarkedLineSyntax(LineSyntax):
    """LineSyntax plus a `#@@<file>:<line>` YAML comment after every plain text line."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        env = self.environment
        origin = env.loader.origin(name) if name else None
        path_index = env.marker_paths.setdefault(origin.path if origin else str(name), len(env.marker_paths))
        offset = origin.line_offset if origin else 0
        lines = preprocess(source, name, filename).split("\n")
        inside = None
        for i, line in enumerate(lines):
            ok, inside = _markable(line, inside)
            if ok:
                lines[i] = f"{line} #@@{path_index}:{i + 1 + offset}"
        return "\n".join(lines)


def _toyaml(value: Any, *default: Any) -> str:
    """Render a value as inline YAML; an undefined value takes the default, or is an error without one."""
    import yaml

    if isinstance(value, jinja2.Undefined):
        if not default:
            value._fail_with_undefined_error()
        value = default[0]
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


class TemplateEnvironment:
    """Renders templates from a search path (project templates, the conf/ library, user paths)."""

    def __init__(self, search_path: list[str]):
        self.search_path = list(search_path)
        self.env = self._make_env(LineSyntax)
        self._marked: jinja2.Environment | None = None

    def _make_env(self, syntax: type[LineSyntax]) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=SplitFileLoader(self.search_path),
            extensions=[syntax],
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            autoescape=False,
        )
        env.globals.update(template_globals.GLOBALS)
        env.filters["toyaml"] = _toyaml
        env.marker_paths = {}
        return env

    def list_templates(self) -> list[str]:
        return self.env.loader.list_templates()

    def source(self, name: str) -> str:
        """The text of one template (one section of a split file), before preprocessing."""
        return self.env.loader.get_source(self.env, name)[0]

    def origin_of(self, name: str) -> SourceLocation:
        origin = self.env.loader.origin(name)
        return SourceLocation(origin.path if origin else name, 1 + (origin.line_offset if origin else 0))

    def loaded_templates(self) -> set[str]:
        """Names of every template (and sub-template) loaded so far."""
        return set(self.env.loader.origins)

    def source_files(self) -> list[str]:
        """Every file this environment has loaded so far (the template sources a run depends on)."""
        return sorted({origin.path for origin in self.env.loader.origins.values()})

    def render(self, name: str, **context: Any) -> str:
        try:
            return self.env.get_template(name).render(**context)
        except TemplateError:
            raise
        except Exception as error:  # every Jinja failure, and exceptions raised inside expressions
            raise self._translate(error, name) from error

    def locate(self, name: str, output_line: int, **context: Any) -> tuple[SourceLocation, bool] | None:
        """The template line behind line `output_line` (1-based) of `render(name)`; the flag says if exact."""
        if self._marked is None:
            self._marked = self._make_env(_MarkedLineSyntax)
        try:
            lines = self._marked.get_template(name).render(**context).split("\n")
        except Exception:
            return None
        paths = {index: path for path, index in self._marked.marker_paths.items()}
        for number in range(min(output_line, len(lines)) - 1, -1, -1):
            match = _MARKER.search(lines[number])
            if match:
                location = SourceLocation(paths[int(match.group(1))], int(match.group(2)))
                return location, number == output_line - 1
        return None

    # -- errors -------------------------------------------------------------------------------------------

    def _location(self, template_name: str | None, lineno: int | None) -> SourceLocation:
        origin = self.env.loader.origin(template_name) if template_name else None
        if origin is None:
            return SourceLocation(template_name or "<string>", lineno or 0)
        return SourceLocation(origin.path, (lineno or 0) + origin.line_offset)

    def _template_frames(self, tb: TracebackType | None) -> list[SourceLocation]:
        """The template lines on the stack, outermost first: the extends/include chain."""
        chain: list[SourceLocation] = []
        origins = self.env.loader.origins_by_filename
        for frame, lineno in traceback.walk_tb(tb):
            origin = origins.get(frame.f_code.co_filename)
            if origin is not None:
                location = SourceLocation(origin.path, lineno + origin.line_offset)
                if not chain or chain[-1] != location:
                    chain.append(location)
        return chain

    def _translate(self, error: Exception, name: str) -> TemplateError:
        chain = self._template_frames(error.__traceback__)
        if isinstance(error, jinja2.TemplateSyntaxError):
            location = self._location(error.name, error.lineno)
            if not chain or chain[-1] != location:
                chain.append(location)
            message = f"template syntax error: {error.message}"
        elif isinstance(error, jinja2.TemplateNotFound):
            message = self._not_found_message(error)
        elif isinstance(error, jinja2.UndefinedError):
            message = f"undefined variable: {error.message}; define it (-- set ...) or pass it in"
        else:
            message = f"{type(error).__name__}: {error}"
        if not chain:
            chain.append(self._location(name, 0))
        return TemplateError(message, chain)

    def _not_found_message(self, error: jinja2.TemplateNotFound) -> str:
        missing = error.name if isinstance(error.name, str) else str(error)
        close = difflib.get_close_matches(missing, self.list_templates(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        paths = ", ".join(self.search_path)
        return f"template {missing!r} not found in the search path [{paths}]{hint}"
