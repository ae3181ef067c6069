"""The line syntax: a preprocessor that rewrites Forgather's compact lines into plain Jinja2.

The rules are the reference Forgather's (jdinalt/forgather, `preprocess.py`), so that its templates render
here to the same text. Two passes, each one line in, one line out:

1. Lines (split on `\\n`, `\\r\\n` or `\\r`):

       ## comment   -> {# comment #}        a line of only a comment (leading whitespace allowed)
       text ## c    -> text                 from the last whitespace + `##` (or more `#`) to the end
       -- stmt      -> {% stmt %}           the whole line is replaced, leading whitespace included,
       << stmt      -> {%- stmt %}          so `    == super()` prints the parent's lines at their own
       >> stmt      -> {% stmt -%}          indentation; the operator must be followed by whitespace
       == expr      -> {{ expr }}
       => expr      -> {{ expr|trim('\\n') }} newlines trimmed from the value only

2. Blocks: a line `[name]` (any indentation, nothing else on it) opens `{% block name %}`; `[name!]` opens
   `{% filter trim %}{% block name %}`. A block stays open until the next header at the same or a lower
   indentation, or the end of the template (never at a dedented text line), so blocks nest by indentation.
   Its closing tag `{% endblock name +%}` (plus `{% endfilter %}`) is appended to the last line before that
   header, after `{{ '\\n' }}` when that line has content. The `+` keeps the newline after the tag, which is
   why a template renders a blank line between consecutive blocks.

The environment renders with trim_blocks (a line that is only a statement or a comment leaves nothing) and,
as the reference does, without lstrip_blocks or a kept trailing newline.

Contract: the output has exactly as many lines as the input and line n comes from line n, so Jinja's line
numbers are the author's. `expand_lines` and `expand_blocks` are the two passes, apart so that the
environment can annotate text lines between them (see `environment.locate`).
"""

from __future__ import annotations

import re

from jinja2.ext import Extension

_NEWLINE = re.compile(r"\n|\r\n|\r")
_COMMENT_LINE = re.compile(r"\s*##(.*)")
_TRAILING_COMMENT = re.compile(r"(.*)\s+#{2,}.*")
_STATEMENT = re.compile(r"\s*(--|<<|>>|==|=>)\s(.*)")
_HEADER = re.compile(r"(\s*)\[(\w+)(!*)\]\s*")

_REWRITES = {
    "--": "{{% {} %}}",
    "<<": "{{%- {} %}}",
    ">>": "{{% {} -%}}",
    "==": "{{{{ {} }}}}",
    "=>": "{{{{ {}|trim('\\n') }}}}",
}


def _expand_line(line: str) -> str:
    comment = _COMMENT_LINE.fullmatch(line)
    if comment:
        # A comment stays a (Jinja) comment line, keeping line numbers; `#}` inside must not end it early.
        return "{# " + comment.group(1).replace("#}", "# }") + " #}"
    trailing = _TRAILING_COMMENT.fullmatch(line)
    if trailing:
        line = trailing.group(1)
    statement = _STATEMENT.fullmatch(line)
    if statement:
        return _REWRITES[statement.group(1)].format(statement.group(2))
    return line


def expand_lines(source: str) -> list[str]:
    """Pass 1: comments removed and line statements rewritten, one output line per input line."""
    return [_expand_line(line) for line in _NEWLINE.split(source)]


def is_block_header(line: str) -> bool:
    return _HEADER.fullmatch(line) is not None


def expand_blocks(lines: list[str]) -> str:
    """Pass 2: `[name]` headers become blocks closed by indentation (see the module docstring)."""
    out: list[str] = []
    stack: list[tuple[str, int, bool]] = []  # (name, indentation, trimmed)

    def close(name: str, trimmed: bool) -> None:
        if out[-1]:
            out[-1] += "{{ '\\n' }}"
        out[-1] += f"{{% endblock {name} +%}}" + ("{% endfilter %}" if trimmed else "")

    for line in lines:
        header = _HEADER.fullmatch(line)
        if header is None:
            out.append(line)
            continue
        indent, name, trimmed = len(header.group(1)), header.group(2), bool(header.group(3))
        while stack and stack[-1][1] >= indent:
            closed, _, closed_trimmed = stack.pop()
            close(closed, closed_trimmed)
        out.append(("{% filter trim %}" if trimmed else "") + f"{{% block {name} %}}")
        stack.append((name, indent, trimmed))
    while stack:
        closed, _, closed_trimmed = stack.pop()
        close(closed, closed_trimmed)
    return "\n".join(out)


def preprocess(source: str) -> str:
    """Rewrite the line syntax of one template into Jinja2, line for line (see the module docstring)."""
    return expand_blocks(expand_lines(source))


class LineSyntax(Extension):
    """Jinja2 extension that applies `preprocess` to every template source."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        return preprocess(source)
