"""The Jinja2 environment of the template stage, and rendering with errors that name the author's lines.

`TemplateEnvironment(search_path)` renders a template by name to YAML text, with the reference Forgather's
settings: Jinja's sandbox (a template can read values and call the globals, never reach Python's internals,
so `pp`/`graph`/`targets`/`code` run no code a template names), trim_blocks, StrictUndefined. Every failure
(syntax, undefined variable, missing template, an exception inside an expression, a NUL byte, an include
or extends cycle, the sandbox refusing) becomes a `TemplateError` naming the original file and line (not the
preprocessed text, and inside split files the line of the file) plus the chain of extends/includes that led
there.

A block that a child defines but no template it extends does (a misspelled `[optimzer_args]`) is never
rendered: it is reported as a `TemplateWarning` at its header, naming the closest block that is, or as an
error in strict mode (`strict=True`, or FORGATHER_STRICT=1 in the environment).

`locate(name, line)` maps a line of the rendered output back to the template line that produced it. It
renders once more with a marker comment after every plain text line (the markers never reach the real
output, so they cannot change its meaning); only error paths pay for it.
"""

from __future__ import annotations

import difflib
import os
import re
import traceback
import warnings
from types import TracebackType
from typing import Any, Callable, Iterable

import jinja2
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox

from forgather.errors import strict_mode
from forgather.template import globals as template_globals
from forgather.template.errors import SourceLocation, TemplateError, TemplateWarning
from forgather.template.loader import Origin, SplitFileLoader, TemplateNameError
from forgather.template.preprocess import LineSyntax, expand_blocks, expand_lines, is_block_header

_MARKER = re.compile(r" ?#@@(\d+):(\d+)$")  # the space goes where a filter (trim) strips a marker-only line
_MARKERS = re.compile(r" ?#@@\d+:\d+")  # a line may hold several: an include's last line runs into the next
_TAG = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}


def _markable(line: str, inside: str | None) -> tuple[bool, str | None]:
    """Whether a marker may follow this line (after pass 1), and the open-tag state after it.

    Not inside a tag spanning lines, not blank, and not after a tag that eats the line's newline (trim_blocks
    after `%}` and `#}`, `-}}`): a marker there would add an output line."""
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
        lines = expand_lines(source)
        inside = None
        for i, line in enumerate(lines):
            if is_block_header(line):
                continue
            ok, inside = _markable(line, inside)
            if ok:
                lines[i] = f"{line} #@@{path_index}:{i + 1 + offset}"
        return expand_blocks(lines)


def _toyaml(value: Any, *default: Any) -> str:
    """Inline YAML of a value, as the reference writes it: ints and bools by `str` (`True`), None as
    `null`, anything else by PyYAML's flow style (keys sorted). An undefined value takes the default, or is
    an error without one."""
    import yaml

    if isinstance(value, jinja2.Undefined):
        if not default:
            value._fail_with_undefined_error()
        value = default[0]
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=float("inf")).strip()
    # A scalar is dumped as a document with an end marker ("0.001\n..."); the marker is not the value.
    if text.endswith("\n..."):
        return text[:-4]
    return text[:-3] if text.endswith("...") else text


class _Blocks(dict):
    """A context's blocks (name -> implementations, child first) that records every block looked up: a
    lookup is a render, a `super()` or a `self.name()`, so a block never looked up is never rendered."""

    def __init__(self, blocks: dict[str, list[Callable]], reached: set[Callable]):
        super().__init__(blocks)
        self.reached = reached

    def __getitem__(self, name: str) -> list[Callable]:
        found = super().__getitem__(name)
        self.reached.update(found)
        return found


class _Context(jinja2.runtime.Context):
    """A Jinja context that, while its environment is recording, registers itself and its block lookups."""

    def __init__(self, environment: jinja2.Environment, *args: Any, **kwargs: Any):
        super().__init__(environment, *args, **kwargs)
        if environment.recording is not None:
            contexts, reached = environment.recording
            self.blocks = _Blocks(self.blocks, reached)
            contexts.append(self)


class _Environment(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox, with contexts that can record block lookups and a registry of the marked files."""

    context_class = _Context

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.recording: tuple[list[jinja2.runtime.Context], set[Callable]] | None = None  # set by render()
        self.marker_paths: dict[str, int] = {}  # file -> its index in `#@@<index>:<line>` markers

    def get_or_select_template(self, template_name_or_list: Any, parent: str | None = None,
                               globals: Any = None) -> jinja2.Template:
        # `-- include 7`: Jinja takes what is not a name for a list of names to try, and fails iterating it
        # (a TypeError); a list's items reach the loader's own check of each name.
        if not isinstance(template_name_or_list, (str, jinja2.Template, jinja2.Undefined, list, tuple)):
            raise TemplateNameError(template_name_or_list)
        return super().get_or_select_template(template_name_or_list, parent, globals)


def nearest_location(lines: list[SourceLocation | None], output_line: int) -> tuple[SourceLocation, bool] | None:
    """From `locate_lines`: the location of line `output_line` (1-based), else of the nearest line above it."""
    for number in range(min(output_line, len(lines)), 0, -1):
        location = lines[number - 1]
        if location is not None:
            return location, number == output_line
    return None



def _first_dropped_line(output: jinja2.nodes.Output) -> int | None:
    """The line of the first text of `output` that is more than blank lines and YAML comments (an expression
    counts as text), or None."""
    for child in output.nodes:
        if not isinstance(child, jinja2.nodes.TemplateData):
            return child.lineno
        line = child.lineno
        for text in child.data.split("\n"):
            if text.strip() and not text.lstrip().startswith("#"):
                return line
            line += 1
    return None


def _merged(locations: Iterable[SourceLocation]) -> list[SourceLocation]:
    """The locations without consecutive repeats: the frames of a template and of its blocks at one line are
    one link of the chain."""
    chain: list[SourceLocation] = []
    for location in locations:
        if not chain or chain[-1] != location:
            chain.append(location)
    return chain


# Jinja's words for an `-- if`/`-- for` left open inside a `[block]`: the preprocessor's endblock met it.
_OPEN_AT_BLOCK_END = re.compile(r"Encountered unknown tag 'endblock'\..*The innermost block that needs to be closed is '(\w+)'", re.S)


def _unclosed_in_block(message: str | None) -> str | None:
    """Jinja's complaint about an `endblock` the author never wrote (the line syntax closes a [block] itself,
    at the next header or the end of the file), said as the author's mistake: what is left open."""
    found = _OPEN_AT_BLOCK_END.search(message or "")
    if found is None:
        return None
    tag = found.group(1)
    return (f"a [block] ends here (at the next [header] of its indentation, or the end of the file) with its "
            f"'-- {tag}' still open; close it (-- end{tag}) inside the block")


class TemplateEnvironment:
    """Renders templates from a search path (project templates, the conf/ library, user paths)."""

    def __init__(self, search_path: list[str], strict: bool | None = None):
        self.search_path = list(search_path)
        self.strict = strict_mode() if strict is None else strict
        self.env = self._make_env(LineSyntax)
        self._marked: _Environment | None = None
        self._text_checked: set[str] = set()

    def _make_env(self, syntax: type[LineSyntax]) -> _Environment:
        env = _Environment(loader=SplitFileLoader(self.search_path), extensions=[syntax], undefined=jinja2.StrictUndefined, trim_blocks=True)
        env.globals.update(template_globals.GLOBALS)
        env.filters["toyaml"] = _toyaml
        return env

    def list_templates(self) -> list[str]:
        return self.env.loader.list_templates()

    def source(self, name: str) -> str:
        """The text of one template (one section of a split file), before preprocessing."""
        return self.env.loader.get_source(self.env, name)[0]

    def references(self, name: str) -> list[str]:
        """The templates `name` names itself (extends, include, import with a literal name), in source order;
        a name held in a variable is known only by rendering."""
        import jinja2.meta

        return [ref for ref in jinja2.meta.find_referenced_templates(self.env.parse(self.source(name))) if ref is not None]

    def origin_of(self, name: str) -> SourceLocation:
        origin = self.env.loader.origin(name)
        return SourceLocation(origin.path if origin else name, 1 + (origin.line_offset if origin else 0))

    def loaded_templates(self) -> set[str]:
        """Names of every template (and sub-template) loaded so far."""
        return set(self.env.loader.origins)

    def loaded_in_order(self) -> list[str]:
        """The same names, in the order they were first loaded."""
        return list(self.env.loader.origins)

    def source_files(self) -> list[str]:
        """Every file this environment has loaded so far (the template sources a run depends on)."""
        return sorted({origin.path for origin in self.env.loader.origins.values()})

    def render(self, name: str, **context: Any) -> str:
        contexts: list[jinja2.runtime.Context] = []
        reached: set[Callable] = set()
        self.env.recording = (contexts, reached)
        try:
            text = self.env.get_template(name).render(**context)
        except TemplateError:
            raise
        except RecursionError as error:
            raise self._recursion_error(error, name) from None
        except Exception as error:  # every Jinja failure, and exceptions raised inside expressions
            raise self._translate(error, name) from error
        finally:
            self.env.recording = None
        self._check_unreached_blocks(contexts, reached)
        for loaded in sorted(self.loaded_templates() - self._text_checked):
            self._check_text_outside_blocks(loaded)
        return text

    def locate_lines(self, name: str, **context: Any) -> list[SourceLocation | None] | None:
        """For each line of `render(name)`, the template line that wrote it: None for a line no template text
        line wrote (a blank line, the value of an expression); None for all when rendering fails.

        The marked render (every text line followed by a `#@@` marker) can differ from the real one in more
        than its markers: a text line whose content renders empty is blank in the real render, where a
        whitespace filter (the reference's `-- filter trim()`) drops it, but not with its marker. So the
        marked lines, markers stripped, are aligned with the real render's lines (difflib, which keeps their
        order), and a real line takes the marker of the line it is aligned with."""
        if self._marked is None:
            self._marked = self._make_env(_MarkedLineSyntax)
        try:
            marked = self._marked.get_template(name).render(**context).split("\n")
            real = self.env.get_template(name).render(**context).split("\n")
        except Exception:
            return None
        paths = {index: path for path, index in self._marked.marker_paths.items()}
        plain: list[str] = []
        found: list[SourceLocation | None] = []
        for line in marked:
            match = _MARKER.search(line)
            plain.append(_MARKERS.sub("", line))
            found.append(SourceLocation(paths[int(match.group(1))], int(match.group(2))) if match else None)
        if plain == real:
            return found
        aligned: list[SourceLocation | None] = [None] * len(real)
        matcher = difflib.SequenceMatcher(None, plain, real, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):  # as many lines: line for line
                aligned[j1:j2] = found[i1:i2]
        return aligned

    def locate(self, name: str, output_line: int, **context: Any) -> tuple[SourceLocation, bool] | None:
        """The template line behind line `output_line` (1-based) of `render(name)`, or the nearest line above
        it that has one; the flag says if exact."""
        return nearest_location(self.locate_lines(name, **context) or [], output_line)

    # -- blocks no ancestor defines ------------------------------------------------------------------------

    def _check_unreached_blocks(self, contexts: list[jinja2.runtime.Context], reached: set[Callable]) -> None:
        """Warn (strict: fail) at each block a child defines that no template it extends defines.

        Such a block is never looked up. Its most ancestral implementation (the last of its list) comes
        from a template that itself extends another, else that template renders it, or skips it on purpose
        (a block under a false `-- if`), which is no mistake."""
        checked: set[Callable] = set()
        warned: set[SourceLocation] = set()
        for context in contexts:
            for name, implementations in context.blocks.items():
                block = implementations[-1]
                if block in reached or block in checked:
                    continue
                checked.add(block)
                origin = self.env.loader.origins_by_filename.get(block.__code__.co_filename)
                if origin is None or not self._extends(origin.name):
                    continue
                location = SourceLocation(origin.path, self._header_line(origin.name, name) + origin.line_offset)
                if location in warned:
                    continue
                warned.add(location)
                known = [other for other, impls in context.blocks.items() if other != name and impls[-1] in reached]
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"; did you mean [{close[0]}]?" if close else ""
                message = f"block [{name}] is defined by no template that {origin.name!r} extends, so it is never rendered{hint}"
                if self.strict:
                    raise TemplateError(message, [location])
                warnings.warn_explicit(message, TemplateWarning, location.path, location.line)

    def _check_text_outside_blocks(self, name: str) -> None:
        """Warn (strict: fail) at text that a template which extends another has outside its blocks, after the
        extends line: Jinja renders the parent in its place and drops that text without a word. YAML comments
        (lines starting with `#`) and blank lines are not reported: dropping them changes nothing."""
        self._text_checked.add(name)
        try:
            body = self.env.parse(self.source(name)).body
        except Exception:  # a template that does not parse fails when it renders, with its own error
            return
        extended = False
        for node in body:
            if isinstance(node, jinja2.nodes.Extends):
                extended = True
            elif extended and isinstance(node, jinja2.nodes.Output):
                line = _first_dropped_line(node)
                if line is not None:
                    self._text_outside_blocks(name, line)
                    return

    def _text_outside_blocks(self, name: str, line: int) -> None:
        origin = self.env.loader.origin(name)
        location = SourceLocation(origin.path if origin else name, line + (origin.line_offset if origin else 0))
        message = (f"text outside any block of {name!r}, which extends another template, is never rendered: "
                   f"put it in a block ([name] ... ) or above the extends line")
        if self.strict:
            raise TemplateError(message, [location])
        warnings.warn_explicit(message, TemplateWarning, location.path, location.line)

    def _extends(self, name: str) -> bool:
        ast = self.env.parse(self.source(name))
        return ast.find(jinja2.nodes.Extends) is not None

    def _header_line(self, template: str, block: str) -> int:
        """The line of `template` that opens `block` (0 when it cannot be found)."""
        opens = re.compile(rf"\s*\[{block}!*\]\s*|\s*(--|<<|>>)\s+block\s+{block}\b.*|.*\{{%-?\s*block\s+{block}\b.*")
        for number, line in enumerate(self.source(template).splitlines(), 1):
            if opens.fullmatch(line):
                return number
        return 0

    # -- errors -------------------------------------------------------------------------------------------

    def _recursion_error(self, error: RecursionError, name: str) -> TemplateError:
        """A template that includes or extends itself, through any number of others: the cycle, once."""
        frames = self._frames(error.__traceback__)
        chain = _merged(location for location, _ in frames)
        for end, location in enumerate(chain):
            if location in chain[:end]:
                return self._cycle_error(chain[: end + 1], chain[: end + 1])
        # One template naming itself repeats one location, which the chain holds once: ask its references.
        for location, origin in dict(frames).items():  # each location once, outermost first
            if origin.name in self._literal_references(origin.name):
                return self._cycle_error([location, location], chain[: chain.index(location) + 1])
        return self._translate(error, name)

    @staticmethod
    def _cycle_error(cycle: list[SourceLocation], chain: list[SourceLocation]) -> TemplateError:
        names = " -> ".join(os.path.basename(link.path) for link in cycle)
        message = f"include/extends cycle ({names}): a template includes or extends itself; break the cycle"
        return TemplateError(message, chain)

    def _literal_references(self, name: str) -> list[str]:
        try:
            return self.references(name)
        except Exception:  # a template that does not parse names nothing
            return []

    def _location(self, template_name: str | None, lineno: int | None) -> SourceLocation:
        origin = self.env.loader.origin(template_name) if template_name else None
        if origin is None:
            return SourceLocation(template_name or "<string>", lineno or 0)
        return SourceLocation(origin.path, (lineno or 0) + origin.line_offset)

    def _frames(self, tb: TracebackType | None) -> list[tuple[SourceLocation, Origin]]:
        """The template frames on the stack, outermost first: each one's line and template."""
        frames = []
        origins = self.env.loader.origins_by_filename
        for frame, lineno in traceback.walk_tb(tb):
            origin = origins.get(frame.f_code.co_filename)
            if origin is not None:
                frames.append((SourceLocation(origin.path, lineno + origin.line_offset), origin))
        return frames

    def _template_frames(self, tb: TracebackType | None) -> list[SourceLocation]:
        """The template lines on the stack, outermost first: the extends/include chain."""
        return _merged(location for location, _ in self._frames(tb))

    def _translate(self, error: Exception, name: str) -> TemplateError:
        chain = self._template_frames(error.__traceback__)
        if isinstance(error, jinja2.TemplateSyntaxError):
            location = self._location(error.name, error.lineno)
            if not chain or chain[-1] != location:
                chain.append(location)
            message = f"template syntax error: {_unclosed_in_block(error.message) or error.message}"
        elif isinstance(error, jinja2.TemplateNotFound):
            message = self._not_found_message(error)
        elif isinstance(error, jinja2.sandbox.SecurityError):
            message = f"refused by the template sandbox: {error} (templates read values and call globals; they do not run Python)"
        elif isinstance(error, jinja2.UndefinedError) and " has no attribute " in str(error.message):
            # `{{ q.z }}` with q set: the value lacks the attribute or key, the variable is there
            message = (f"no such attribute or key: {error.message}; check the name after the dot, or give a "
                       f"default for a key that may be missing (NAME.get('key', default))")
        elif isinstance(error, jinja2.UndefinedError):
            message = (f"undefined variable: {error.message}; set it above its use or in a template that extends or "
                       f"includes this one (-- set NAME = ...), or give it a default (NAME | default(...))")
        elif isinstance(error, TemplateNameError):
            message = str(error)
        elif isinstance(error, template_globals.TemplateRaise):
            message = f"the template stopped: {error}"
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
