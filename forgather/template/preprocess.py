"""The line syntax: a preprocessor that rewrites Forgather's compact lines into plain Jinja2.

    ## comment          -> {# comment #}         (also trailing: `text ## comment` keeps `text`)
    -- stmt             -> {% stmt %}
    << stmt             -> {%- stmt %}           (trims whitespace before)
    >> stmt             -> {% stmt -%}           (trims whitespace after)
    == expr             -> {{ expr }}
    => expr             -> {{ expr -}}           (trims whitespace after, joining the next line)
    [name]              -> {% block name %}      closed automatically, see below
    [name!]             -> the same, with blank lines at the start and end of its content dropped
    [/name]             -> closes block `name` (and any block nested in it) before its indentation would

A block opened by a header at indentation i closes before the next header at indentation <= i, before the
next line (text or statement) indented less than i, or at the end of the template. So blocks nest by
indentation, and a nested block can override a sub-mapping of the YAML around it.

Contract: the output has exactly as many lines as the input, and line n of the output comes from line n of
the input (closing tags are prefixed to the line that closes them), so Jinja's line numbers are the
template author's line numbers. The environment renders with trim_blocks and lstrip_blocks, so a line that
holds only a statement or a comment leaves nothing, not even its newline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import TemplateSyntaxError
from jinja2.ext import Extension

_COMMENT_LINE = re.compile(r"^\s*##(.*)$")
_TRAILING_COMMENT = re.compile(r"^(.*?\S)\s+##.*$")
_STATEMENT = re.compile(r"^(\s*)(--|<<|>>|==|=>)(?:\s(.*))?$")
_HEADER = re.compile(r"^(\s*)\[(\w+)(!?)\]\s*$")
_CLOSER = re.compile(r"^\s*\[/(\w+)\]\s*$")
_EMPTY_COMMENT = "{# #}"

_REWRITES = {
    "--": "{{% {} %}}",
    "<<": "{{%- {} %}}",
    ">>": "{{% {} -%}}",
    "==": "{{{{ {} }}}}",
    "=>": "{{{{ {} -}}}}",
}


@dataclass
class _OpenBlock:
    name: str
    indent: int
    trimmed: bool
    first_line: int  # index of the first content line in the output


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _drop_blank_lines(lines: list[str], indices: range) -> None:
    """Replace blank lines with empty comments (which render as nothing) until the first non-blank one."""
    for i in indices:
        if lines[i].strip():
            return
        lines[i] = _EMPTY_COMMENT


def _close(lines: list[str], block: _OpenBlock, at: int) -> str:
    """Finish `block` before output line `at`; returns the closing tag to prefix to that line."""
    if block.trimmed:
        _drop_blank_lines(lines, range(block.first_line, at))
        _drop_blank_lines(lines, range(at - 1, block.first_line - 1, -1))
    return "{% endblock %}"


def preprocess(source: str, name: str | None = None, filename: str | None = None) -> str:
    """Rewrite the line syntax of one template into Jinja2, keeping the line count (see module docstring)."""
    ends_with_newline = source.endswith("\n")
    lines = source.split("\n")
    if ends_with_newline:
        lines.pop()
    out: list[str] = []
    stack: list[_OpenBlock] = []

    def close_while(predicate) -> str:
        closing = ""
        while stack and predicate(stack[-1]):
            closing += _close(out, stack.pop(), len(out))
        return closing

    for line in lines:
        if not line.strip():
            out.append(line)
            continue
        comment = _COMMENT_LINE.match(line)
        if comment:
            out.append("{#" + comment.group(1).replace("#}", "# }") + " #}")
            continue
        trailing = _TRAILING_COMMENT.match(line)
        if trailing:
            line = trailing.group(1)
        indent = _indent(line)
        closer = _CLOSER.match(line)
        if closer:
            if closer.group(1) not in [block.name for block in stack]:
                raise TemplateSyntaxError(f"[/{closer.group(1)}] closes no open block", len(out) + 1, name, filename)
            closing = close_while(lambda block: block.name != closer.group(1))
            closing += _close(out, stack.pop(), len(out))
            out.append(closing)
            continue
        header = _HEADER.match(line)
        if header:
            closing = close_while(lambda block: block.indent >= indent)
            name, trimmed = header.group(2), bool(header.group(3))
            out.append(f"{closing}{{% block {name} %}}")
            stack.append(_OpenBlock(name, indent, trimmed, len(out)))
            continue
        closing = close_while(lambda block: block.indent > indent)
        statement = _STATEMENT.match(line)
        if statement:
            prefix, op, body = statement.groups()
            line = prefix + _REWRITES[op].format((body or "").strip())
        out.append(closing + line)
    # Blocks still open close after the last line, on a line of their own that adds no newline.
    tail = close_while(lambda block: True)
    text = "\n".join(out)
    return text + ("\n" if ends_with_newline else "") + tail


class LineSyntax(Extension):
    """Jinja2 extension that applies `preprocess` to every template source."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        return preprocess(source, name, filename)
