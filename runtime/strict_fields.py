"""The base of every section of the runtime config and of learning policies: values are taken as written.

Pydantic's lax mode would read ``max_new_tokens: true`` as 1 and ``interval_s: .inf`` as infinity; a
configuration file written by hand should say what it means, so these are refused where they are read:

- unknown keys (``extra="forbid"``);
- ``true``/``false`` for a number;
- ``.inf``, ``-.inf`` and ``.nan`` for a number (``allow_inf_nan=False``);
- a NUL character in a string or a path (no file system takes it).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["StrictSection"]


def _accepts(annotation: Any, kind: type) -> bool:
    """Whether a field's annotation is `kind`, or a union/Optional holding it."""
    if annotation is kind:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, kind) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _accepts(typing.get_args(annotation)[0], kind)
    return False


class StrictSection(BaseModel):
    """A configuration section that refuses unknown keys, booleans as numbers, infinities, NaN and NUL."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        annotation = field.annotation
        numeric = _accepts(annotation, int) or _accepts(annotation, float)
        if isinstance(value, bool) and numeric and not _accepts(annotation, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if isinstance(value, str) and "\x00" in value and (_accepts(annotation, str) or _accepts(annotation, Path)):
            raise ValueError("contains a NUL character")
        return value
