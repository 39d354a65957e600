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


MAX_YAML_BYTES = 1 << 20
"""Largest config or policy file read (1 MiB; real ones are a few KB)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings and lists."""
MAX_YAML_NODES = 100_000
"""Most values in a file once aliases are expanded (a "billion laughs" file expands to billions)."""


def read_yaml_mapping(
    path: Path, *, error: type[Exception], what: str, hint: str, if_missing: str = ""
) -> tuple[dict[str, Any], KeyLines]:
    """Parse `path` as a YAML mapping; return the data and the line of every key path.

    A missing file, malformed YAML or a top level that is not a mapping raise `error` with the file and
    line; `what` names the file's role ("config file"), `hint` what the top level should hold and
    `if_missing` what to do about a missing file. So do files that are not UTF-8 text, larger than
    :data:`MAX_YAML_BYTES`, nested deeper than :data:`MAX_YAML_DEPTH`, expanding (through aliases) to more
    than :data:`MAX_YAML_NODES` values, with a recursive alias, or with a key given twice in one mapping.
    The file is parsed once, with the safe loader.
    """
    if not path.is_file():
        raise error(f"{path}: {what} not found{if_missing}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise error(
            f"{path}: {what} is {size:,} bytes, more than the {MAX_YAML_BYTES:,} allowed; is it the right file?"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: KeyLines = {}
        if node is not None:
            _collect_lines(node, (), lines, _Budget(path, error), [])
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: malformed YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise error(f"{path}:1: the top level must be a mapping of {hint}")
    return data, lines


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when PyYAML has it: same rules, faster


class _Budget:
    """What one file's walk may still visit, and the error that says where it overran."""

    def __init__(self, path: Path, error: type[Exception]) -> None:
        self.path, self.error, self.nodes = path, error, 0

    def visit(self, node: yaml.Node, ancestors: list[yaml.Node]) -> None:
        line = node.start_mark.line + 1
        if any(node is a for a in ancestors):
            raise self.error(f"{self.path}:{line}: a YAML alias refers to a value that contains it (recursive)")
        if len(ancestors) >= MAX_YAML_DEPTH:
            raise self.error(f"{self.path}:{line}: nested deeper than {MAX_YAML_DEPTH} levels")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise self.error(
                f"{self.path}:{line}: more than {MAX_YAML_NODES:,} values once aliases are expanded "
                "(aliases of aliases); write the values out"
            )


def _collect_lines(
    node: yaml.Node, prefix: tuple[str, ...], out: KeyLines, budget: _Budget, ancestors: list[yaml.Node]
) -> None:
    budget.visit(node, ancestors)
    if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        return
    ancestors.append(node)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and name != "<<":
                if name in seen:
                    raise budget.error(
                        f"{budget.path}:{line}: key '{'.'.join((*prefix, name))}' is given twice "
                        f"(first on line {seen[name]}); keep one"
                    )
                seen[name] = line
            key = (*prefix, name)
            out.setdefault(key, line)
            _collect_lines(value_node, key, out, budget, ancestors)
    else:
        for i, item in enumerate(node.value):
            key = (*prefix, str(i))
            out.setdefault(key, item.start_mark.line + 1)
            _collect_lines(item, key, out, budget, ancestors)
    ancestors.pop()


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
