"""Hostile and careless config and policy files: each is refused at load with one error naming the file
(and the line where there is one), never a traceback, a hang or a silently changed value."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.checks import check_answer
from policies.loading import PolicyError, load_policy
from policies.safe_regex import check_pattern
from policies.schema import Expectation
from runtime.config import ConfigError, load_config

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

HOSTILE_FILES: dict[str, tuple[bytes, str]] = {
    "billion laughs": (BILLION_LAUGHS.encode(), "aliases"),
    "recursive alias": (b"engine: &a\n  x: *a\n", "recursive"),
    "deep nesting": (("engine: " + "[" * 500 + "]" * 500 + "\n").encode(), "deeper than"),
    "invalid utf-8": (b"engine:\n  device: \xff\xfe cpu\n", "not UTF-8"),
    "utf-16": ("engine:\n  device: cpu\n".encode("utf-16"), "not UTF-8"),
    "duplicate key": (b"engine:\n  device: cpu\n  device: cuda\n", "given twice"),
    "bool as a number": (b"engine:\n  max_new_tokens: true\n", "expected a number"),
    "NUL in a path": (b'store:\n  path: "a\\0b.duckdb"\n', "NUL"),
    "unknown device": (b"engine:\n  device: tpu:9\n", "device"),
    "infinite interval": (b"store:\n  flush_interval_s: .inf\n", "flush_interval_s"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_config_files_get_one_clear_error(case: str, tmp_path: Path) -> None:
    content, expected = HOSTILE_FILES[case]
    path = tmp_path / "runtime.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    message = str(raised.value)
    assert str(path) in message and expected in message, message
    assert len(message.splitlines()) <= 3, message


def test_the_key_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("engine:\n  device: cpu\n  device: cuda\n")
    with pytest.raises(ConfigError, match=r"runtime.yaml:3: key 'engine.device' is given twice \(first on line 2\)"):
        load_config(path, environ={})


def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="bytes, more than"):
        load_config(path, environ={})


def test_paths_that_cannot_be_what_they_name(tmp_path: Path) -> None:
    (tmp_path / "store-dir").mkdir()
    path = tmp_path / "runtime.yaml"
    path.write_text("store:\n  path: store-dir\n")
    with pytest.raises(ConfigError, match=r"runtime.yaml:2: store.path: .* is a directory"):
        load_config(path, environ={})
    path.write_text("policy: missing-policy.yaml\n")
    with pytest.raises(ConfigError, match=r"runtime.yaml:1: policy: policy file .* not found"):
        load_config(path, environ={})


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text("engine: &e\n  device: cpu\n  max_new_tokens: 64\n")
    assert load_config(path, environ={}).engine.max_new_tokens == 64


POLICY_HEAD = "protected:\n  - name: p\n    prompt: hi\n    expect:\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (POLICY_HEAD + "      regex: '(a+)+$'\n", "repeats without bound"),
        (POLICY_HEAD + "      regex: '(x*y*)*z'\n", "repeats without bound"),
        (POLICY_HEAD + "      regex: '(unclosed'\n", "not a valid regular expression"),
        (POLICY_HEAD + "      contains: x\nschedule:\n  cron: '0 0 30 2 *'\n", "never fires"),
        (POLICY_HEAD + "      contains: x\nschedule:\n  interval_s: 1e-300\n", "interval_s"),
        (POLICY_HEAD + "      contains: x\nschedule:\n  interval_s: .inf\n", "interval_s"),
        (POLICY_HEAD + "      contains: x\n      contains: y\n", "given twice"),
    ],
)
def test_hostile_policies_are_refused_at_load(body: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(body)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert expected in str(raised.value) and str(path) in str(raised.value), str(raised.value)


def test_a_slow_regex_fails_its_check_instead_of_hanging_the_gate() -> None:
    """A pattern the load-time check lets through (alternation, not a nested repeat) still cannot hang."""
    check_pattern(r"(a|aa)+$")  # not caught statically
    result = check_answer(Expectation(regex=r"(a|aa)+$"), "a" * 5000 + "!", refusal_markers=[])
    assert not result.passed and "took over" in result.failures[0]


def test_ordinary_patterns_pass_the_check() -> None:
    for pattern in (r"\b\d+\b", r"^[A-Z][a-z]+$", r"(ab)+c", r"colou?r", r"(?:\w+\s){0,5}end"):
        check_pattern(pattern)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400) | st.text(alphabet=string.printable + "&*[]{}:!|>-'\"\u00e9\ud7ff", max_size=400))
def test_no_config_or_policy_file_gives_a_traceback(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "fuzzed.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        load_config(path, environ={})
    except ConfigError:
        pass
    try:
        load_policy(path)
    except PolicyError:
        pass
