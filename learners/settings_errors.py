"""Validation of a learner's settings section, with every problem located by its key path."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

Problem = tuple[tuple[str, ...], str]
"""``(key path inside the section, what is wrong)``."""


class SettingsError(ValueError):
    """A settings section is invalid; ``problems`` locates each problem by its key path."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(loc) or '<section>'}: {msg}" for loc, msg in problems))


def check_dataclass_keys(cls: type, values: Mapping[str, Any], prefix: tuple[str, ...]) -> list[Problem]:
    """Problems for keys of `values` that `cls` (a dataclass) has no field for."""
    known = {f.name for f in dataclasses.fields(cls)}
    return [
        ((*prefix, str(key)), f"unknown key (allowed here: {', '.join(sorted(known))})")
        for key in values
        if key not in known
    ]


def validate_dataclass(cls: type, values: Mapping[str, Any] | None) -> Any:
    """An instance of the settings dataclass `cls` from `values`, type-checked; raises :class:`SettingsError`.

    Unknown keys, values of the wrong type and the class's own checks (``__post_init__``) are all reported.
    """
    values = dict(values or {})
    problems = check_dataclass_keys(cls, values, ())
    if problems:
        raise SettingsError(problems)
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        raise SettingsError([(tuple(str(p) for p in err["loc"]), _message(err)) for err in exc.errors()]) from None


def _message(err: Any) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing", "value_error"):
        message += f" (got {err['input']!r})"
    return message
