"""YAML files read with one error message that names the file, the line and the column.

PyYAML's own message locates the error in `"<unicode string>"` when given the text (and spreads
it over several marks); `yaml_error_message` says which file, where, and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class YAMLFileError(ValueError):
    """A YAML file that does not parse (the message names it, with line and column)."""


def _at(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def yaml_error_message(path: str | Path, err: yaml.YAMLError) -> str:
    """`PATH, line L, column C: YAML syntax error: PROBLEM (CONTEXT at line ...)`, then the
    offending line with a caret under the column, then what to do."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or not problem:
        return f"{path} is not valid YAML: {err}; fix the file and rerun"
    text = f"{path}, {_at(mark)}: YAML syntax error: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at {_at(context_mark)}" if context_mark else "") + ")"
    buffer = mark.buffer.rstrip("\0") if isinstance(mark.buffer, str) else ""
    lines = buffer.splitlines()
    if 0 <= mark.line < len(lines) and lines[mark.line].strip():
        text += f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
    return text + "\nfix the file there and rerun"


def load_yaml_file(path: str | Path, what: str = "") -> Any:
    """`yaml.safe_load` of the file; a syntax error raises `YAMLFileError` naming the file
    (prefixed by `what`, e.g. "recipe")."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise YAMLFileError(yaml_error_message(f"{what} {path}".strip(), err)) from None


def read_yaml_file(path: Path, what: str, error: type[Exception] = YAMLFileError) -> Any:
    """`load_yaml_file` of the `what` file (e.g. "recipe") at `path`; a missing file or a syntax
    error raises `error` (the caller's own error type)."""
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        return load_yaml_file(path, what)
    except YAMLFileError as err:
        raise error(str(err)) from None
