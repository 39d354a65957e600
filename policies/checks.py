"""Checking one answer against an :class:`~policies.schema.Expectation` (everything but KL, which needs
the engine: see :mod:`policies.gate`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.safe_regex import RegexTimeout, search
from policies.schema import Expectation

_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class AnswerCheck:
    """The outcome of checking one answer: ``passed``, and why not."""

    passed: bool
    failures: list[str] = field(default_factory=list)


def is_refusal(answer: str, markers: Sequence[str]) -> bool:
    """Whether `answer` contains one of the refusal `markers` (case-insensitive; curly apostrophes folded)."""
    text = answer.lower().replace("\u2019", "'")
    return any(m.lower() in text for m in markers)


def extract_json(answer: str) -> Any:
    """The JSON value in `answer`: the whole text, a fenced ``` block, or the outermost {...} / [...] span.

    Raises ``ValueError`` when there is none.
    """
    candidates = [answer.strip()]
    candidates += [m.strip() for m in _FENCED.findall(answer)]
    for open_c, close_c in ("{}", "[]"):
        start, end = answer.find(open_c), answer.rfind(close_c)
        if 0 <= start < end:
            candidates.append(answer[start : end + 1])
    for text in candidates:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            continue
    raise ValueError("the answer holds no JSON value")


def check_answer(expect: Expectation, answer: str, *, refusal_markers: Sequence[str]) -> AnswerCheck:
    """Check every answer-level key of `expect` on `answer` (``max_kl_to_base`` is ignored here)."""
    failures: list[str] = []
    fold = (lambda s: s) if expect.case_sensitive else str.lower
    text = fold(answer)
    for needle in _as_list(expect.contains):
        if fold(needle) not in text:
            failures.append(f"does not contain {needle!r}")
    if expect.contains_any is not None and not any(fold(n) in text for n in expect.contains_any):
        failures.append(f"contains none of {expect.contains_any!r}")
    for needle in _as_list(expect.not_contains):
        if fold(needle) in text:
            failures.append(f"contains {needle!r}")
    if expect.regex is not None:
        try:
            if not search(expect.regex, answer):
                failures.append(f"does not match /{expect.regex}/")
        except RegexTimeout as exc:
            failures.append(f"could not be checked: {exc}")
    if expect.equals is not None and fold(answer.strip()) != fold(expect.equals.strip()):
        failures.append(f"is not equal to {expect.equals!r}")
    if expect.refuses is not None and is_refusal(answer, refusal_markers) != expect.refuses:
        failures.append("does not refuse" if expect.refuses else "refuses")
    if expect.json_schema is not None:
        failures.extend(_schema_failures(expect.json_schema, answer))
    if expect.json_keys is not None:
        failures.extend(_schema_failures({"type": "object", "required": list(expect.json_keys)}, answer))
    return AnswerCheck(not failures, failures)


def _schema_failures(schema: dict[str, Any], answer: str) -> list[str]:
    import jsonschema

    try:
        value = extract_json(answer)
    except ValueError as exc:
        return [str(exc)]
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    return [f"JSON does not match the schema: {e.message}" for e in errors[:3]]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
