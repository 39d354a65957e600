"""YAML files whose validation errors name the file, the line and the key.

Shared by the runtime config (:mod:`runtime.config`) and learning policies (:mod:`policies`): pydantic does
not know YAML positions, so the reader keeps a map from each key path to its line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

KeyLines = dict[tuple[str, ...], int]
"""Key path (mapping keys and list indexes as strings) -> 1-based line number."""


def read_yaml_mapping(
    path: Path, *, error: type[Exception], what: str, hint: str, if_missing: str = ""
) -> tuple[dict[str, Any], KeyLines]:
    """Parse `path` as a YAML mapping; return the data and the line of every key path.

    A missing file, malformed YAML or a top level that is not a mapping raise `error` with the file and
    line; `what` names the file's role ("config file"), `hint` what the top level should hold and
    `if_missing` what to do about a missing file.
    """
    if not path.is_file():
        raise error(f"{path}: {what} not found{if_missing}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise error(f"{path}:1: the top level must be a mapping of {hint}")
    lines: KeyLines = {}
    _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node | None, prefix: tuple[str, ...], out: KeyLines) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (str(key_node.value),)
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = prefix + (str(i),)
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key, out)


def describe_validation_error(
    exc: ValidationError,
    source: str,
    lines: KeyLines,
    root: type[BaseModel],
    *,
    title: str,
    env_keys: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    """One line per problem: ``file:line: key: what is wrong`` (or the environment variable that set it)."""
    env_keys = env_keys or {}
    problems = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        key = ".".join(loc) or "<root>"
        if loc in env_keys:
            where = f"environment variable {env_keys[loc]}"
        else:
            line = nearest_line(loc, lines)
            where = f"{source}:{line}" if line else source
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{key}'"
            parent = _model_at(root, loc[:-1])
            if parent is not None:
                msg += f" (allowed here: {', '.join(sorted(parent.model_fields))})"
        else:
            msg = f"{key}: {err['msg']}"
            if "input" in err and err["type"] != "missing":
                msg += f" (got {err['input']!r})"
        problems.append(f"{where}: {msg}")
    return f"{title}:\n  " + "\n  ".join(problems)


def describe_problems(
    problems: list[tuple[tuple[str, ...], str]],
    source: str,
    lines: KeyLines,
    *,
    title: str,
    env_keys: Mapping[tuple[str, ...], str] | None = None,
) -> str:
    """One line per ``(key path, message)`` problem found outside pydantic: ``file:line: key: message``."""
    env_keys = env_keys or {}
    out = []
    for loc, message in problems:
        env = next((env_keys[loc[:end]] for end in range(len(loc), 0, -1) if loc[:end] in env_keys), None)
        line = nearest_line(loc, lines)
        where = f"environment variable {env}" if env else (f"{source}:{line}" if line else source)
        out.append(f"{where}: {'.'.join(loc)}: {message}")
    return f"{title}:\n  " + "\n  ".join(out)


def nearest_line(loc: tuple[str, ...], lines: KeyLines) -> int | None:
    """The line of `loc`, or of its closest ancestor that has one."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _model_at(root: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The pydantic model at key path `loc` (list indexes step into the item model), if any."""
    model: type[BaseModel] = root
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model
