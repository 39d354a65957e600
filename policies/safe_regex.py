"""Policy regular expressions that cannot hang the gate.

A policy's ``regex`` is matched against model answers the policy's author does not control. Two guards:

- at load, :func:`check_pattern` refuses a pattern that does not compile, or that repeats a group which itself
  repeats without bound (``(a+)+``, ``(x*y*)*``): the shape of catastrophic backtracking;
- when matching, :func:`search` runs on the PyPI ``regex`` engine with a time limit; a match that runs out of
  time is a failed check with that reason, never a stuck gate.
"""

from __future__ import annotations

import re
import re._parser as sre_parse  # the standard library's own parser of patterns (public as sre_parse until 3.11)
from typing import Any

import regex

__all__ = ["MATCH_TIMEOUT_S", "RegexTimeout", "check_pattern", "search"]

MATCH_TIMEOUT_S = 1.0
"""Longest time one answer may take to match one policy regex."""

_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}


class RegexTimeout(Exception):
    """Matching a policy regex took longer than :data:`MATCH_TIMEOUT_S`."""


def check_pattern(pattern: str) -> None:
    """Raise ``ValueError`` (the reason) when `pattern` does not compile or nests unbounded repeats."""
    try:
        regex.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (regex.error, re.error) as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if _nested_unbounded(parsed, inside_repeat=False):
        raise ValueError(
            "a repeated group that itself repeats without bound (like (a+)+) can take exponential time on a "
            "long answer; rewrite it without the nesting (e.g. a+)"
        )


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches somewhere in `text`; :class:`RegexTimeout` past :data:`MATCH_TIMEOUT_S`."""
    try:
        return regex.search(pattern, text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RegexTimeout(f"/{pattern}/ took over {MATCH_TIMEOUT_S:g} s on a {len(text)}-character answer") from None


def _nested_unbounded(items: Any, inside_repeat: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            low, high, sub = arg
            unbounded = high == sre_parse.MAXREPEAT or high > 1000
            if unbounded and inside_repeat:
                return True
            if _nested_unbounded(sub, inside_repeat or unbounded):
                return True
        elif op is sre_parse.SUBPATTERN:
            if _nested_unbounded(arg[-1], inside_repeat):
                return True
        elif op is sre_parse.BRANCH:
            if any(_nested_unbounded(branch, inside_repeat) for branch in arg[1]):
                return True
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            if _nested_unbounded(arg[1], inside_repeat):
                return True
    return False
