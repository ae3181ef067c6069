"""A user's YAML file of one mapping (a token file, an inference config): its values and the line of each
top-level key, so that a wrong key or value is reported at its line. PyYAML's safe_load drops positions; its
compose keeps them, so both are read. Standard library and PyYAML only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def key_lines(document: yaml.Node | None) -> dict[Any, int]:
    """{key: its 1-based line} for the top-level keys of a composed YAML mapping ({} for anything else)."""
    if not isinstance(document, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in document.value if isinstance(key, yaml.ScalarNode)}


def read_mapping(path: str | Path, what: str) -> tuple[dict, dict[Any, int]]:
    """(values, key lines) of the YAML mapping in `path`; an empty file is an empty mapping. A missing file,
    YAML that does not parse, or a document that is no mapping is an error naming the file and `what` it
    should be (e.g. "a YAML file of option values")."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; give {what}") from None
    try:
        values, document = yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML ({getattr(error, 'problem', None) or error}); {what} expected") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {what} expected, a mapping, not a {type(values).__name__}")
    return values, key_lines(document)
