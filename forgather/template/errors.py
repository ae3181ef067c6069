"""Errors of the template and YAML stages: a message plus where, in the author's own files."""

from __future__ import annotations

from typing import NamedTuple

from forgather.errors import UserError


class SourceLocation(NamedTuple):
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


class TemplateError(UserError):
    """A failure located in a template: `chain` runs from the requested template to the failing line."""

    def __init__(self, message: str, chain: list[SourceLocation]):
        self.message = message
        self.chain = list(chain)
        super().__init__(self.__str__())

    @property
    def location(self) -> SourceLocation:
        return self.chain[-1]

    def __str__(self) -> str:
        lines = [f"{self.location}: {self.message}"]
        lines += [f"  from {link}" for link in reversed(self.chain[:-1])]
        return "\n".join(lines)


class TemplateWarning(UserWarning):
    """Something in a template that is probably a mistake but renders (e.g. a block no ancestor defines)."""
