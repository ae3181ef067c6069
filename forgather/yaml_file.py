"""A user's YAML file of one mapping (a token file, an inference config): its values and the line of each
top-level key, so that a wrong key or value is reported at its line. PyYAML's safe_load drops positions; its
compose keeps them, so both are read. Also the reading of files Forgather itself recorded (`read_recorded`).
Standard library and PyYAML only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

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


def read_recorded(path: str | Path, shape: type | tuple[type, ...], fix: str, parse: Callable[[str], Any] = yaml.safe_load) -> Any:
    """The value of a file Forgather wrote and reads back (a run's snapshot, a sweep's record, a point's
    outcome), parsed by `parse` (YAML by default; `json.loads` for JSON) and checked to be a `shape`. These
    files are written atomically, so one that does not read was edited by hand or damaged on disk: that is an
    error naming the file (and the line, where the parser knows it) and `fix`, what to do about it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: the recorded {path.name} is damaged (bytes that are not UTF-8); {fix}") from None
    try:
        value = parse(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: the recorded {path.name} is not valid YAML ({getattr(error, 'problem', None) or error}); {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: the recorded {path.name} is not valid JSON ({error.msg}); {fix}") from None
    except Exception as error:  # another parser's complaint (OmegaConf's)
        raise ValueError(f"{path}: the recorded {path.name} does not read ({str(error).splitlines()[0]}); {fix}") from None
    if value is None or not isinstance(value, shape):
        found = "empty" if value is None else f"a {_kind(type(value))}"
        wanted = " or ".join(_kind(t) for t in (shape if isinstance(shape, tuple) else (shape,)))
        raise ValueError(f"{path}: the recorded {path.name} is {found}, where Forgather wrote a {wanted}; {fix}")
    return value


def _kind(kind: type) -> str:
    """A YAML reader's word for a Python (or OmegaConf) type."""
    return {"dict": "mapping", "DictConfig": "mapping", "list": "list", "ListConfig": "list", "str": "string"}.get(kind.__name__, kind.__name__)
