"""Reading JSONL files: one JSON object per line, errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JSONLError(ValueError):
    """A JSONL file cannot be read: the message names the file and the line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of `path`.

    Raises :class:`JSONLError` for a missing or undecodable file, a line that is not JSON, or a line whose
    value is not an object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JSONLError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise JSONLError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JSONLError(f"{path}:{number}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise JSONLError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row
