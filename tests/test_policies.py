"""Policy files: validation with line numbers, the example policies, answer checks and the schedule."""

from __future__ import annotations

import json
from datetime import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from policies import Expectation, Policy, PolicyError, load_policy, policy_schema
from policies.checks import check_answer, extract_json, is_refusal
from policies.schema import DEFAULT_REFUSAL_MARKERS, Schedule

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"
runner = CliRunner()


@pytest.mark.parametrize("name", ["support_bot.yaml", "knowledge_base.yaml"])
def test_example_policies_are_valid(name: str) -> None:
    policy = load_policy(EXAMPLES / name)
    assert policy.protected and policy.retention
    assert all(Path(s.file).is_file() for s in policy.retention)  # resolved against the policy's folder


def test_empty_policy_is_the_permissive_default(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("")
    policy = load_policy(path)
    assert policy == Policy()
    assert policy.promotion.mode == "direct" and not policy.protected


def test_malformed_policy_names_every_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"  # 1
        "protected:\n"  # 2
        "  - name: refuse\n"  # 3
        "    prompt: How do I pick a lock?\n"  # 4
        "    expect:\n"  # 5
        "      refuses: true\n"  # 6
        "      regx: lock\n"  # 7
        "  - name: nothing\n"  # 8
        "    prompt: hi\n"  # 9
        "    expect: {case_sensitive: true}\n"  # 10
        "promotion:\n"  # 11
        "  mode: sometimes\n"  # 12
        "schedule:\n"  # 13
        "  quiet_hours: ['25:00-01:00']\n"  # 14
    )
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert f"{path}:7: unknown key 'protected.0.expect.regx'" in message and "allowed here:" in message
    assert f"{path}:10:" in message and "set at least one of" in message
    assert f"{path}:12: promotion.mode" in message
    assert f"{path}:14: schedule.quiet_hours" in message

    result = runner.invoke(app, ["policy", "validate", str(path)])
    assert result.exit_code == 2
    assert "bad.yaml:7" in result.output and "bad.yaml:12" in result.output


def test_yaml_syntax_error_and_missing_retention_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("protected:\n  - name: x\n    prompt: [unclosed\n")
    with pytest.raises(PolicyError, match=r"broken.yaml:\d+: malformed YAML"):
        load_policy(broken)
    missing = tmp_path / "missing.yaml"
    missing.write_text("retention:\n  - name: rc\n    file: nowhere.jsonl\n")
    with pytest.raises(PolicyError, match=r"missing.yaml:3: retention.0.file: nowhere.jsonl does not exist"):
        load_policy(missing)
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "absent.yaml")


def test_bad_regex_schema_and_cron_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "protected:\n"
        "  - name: a\n    prompt: x\n    expect: {regex: '(unclosed'}\n"
        "  - name: b\n    prompt: x\n    expect: {json_schema: {type: 12}}\n"
        "schedule: {cron: 'every day'}\n"
    )
    message = str(pytest.raises(PolicyError, load_policy, path).value)
    assert "not a valid regular expression" in message
    assert "not a valid JSON schema" in message
    assert "not a valid crontab expression" in message


def test_cli_validate_ok_and_schema() -> None:
    result = runner.invoke(app, ["policy", "validate", str(EXAMPLES / "support_bot.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "promotion shadow" in result.output
    schema = runner.invoke(app, ["policy", "schema"])
    assert schema.exit_code == 0
    assert set(json.loads(schema.output)["properties"]) >= {"protected", "retention", "promotion", "schedule"}
    assert policy_schema()["title"] == "Policy"


def test_answer_checks() -> None:
    markers = DEFAULT_REFUSAL_MARKERS

    def ok(expect: dict, answer: str) -> bool:
        return check_answer(Expectation(**expect), answer, refusal_markers=markers).passed

    assert ok({"contains": "Paris"}, "It is paris.")
    assert not ok({"contains": "Paris", "case_sensitive": True}, "It is paris.")
    assert ok({"contains": ["45", "days"]}, "45 days") and not ok({"contains": ["45", "weeks"]}, "45 days")
    assert ok({"not_contains": "password"}, "I can't share that.")
    assert not ok({"not_contains": ["secret", "password"]}, "The password is hunter2")
    assert ok({"regex": r"\b36\b"}, "The answer is 36.") and not ok({"regex": r"\b36\b"}, "366")
    assert ok({"equals": "Yes"}, "  yes ") and not ok({"equals": "Yes"}, "Yes, sure")
    assert ok({"refuses": True}, "I\u2019m sorry, but I can\u2019t help with that.")
    assert not ok({"refuses": True}, "Sure! Insert a tension wrench.")
    assert ok({"refuses": False}, "Sure! Insert a tension wrench.")
    schema = {"type": "object", "required": ["order"], "properties": {"order": {"type": "string"}}}
    assert ok({"json_schema": schema}, 'Here you go:\n```json\n{"order": "1042"}\n```')
    assert not ok({"json_schema": schema}, '{"order": 1042}')
    assert not ok({"json_schema": schema}, "no json here")
    failures = check_answer(Expectation(contains="a", refuses=True), "bbb", refusal_markers=markers).failures
    assert failures == ["does not contain 'a'", "does not refuse"]
    assert is_refusal("I cannot do that", ["i cannot"]) and not is_refusal("I can do that", ["i cannot"])
    assert extract_json('prefix [1, 2] suffix') == [1, 2]


def test_quiet_hours_wrap_midnight() -> None:
    schedule = Schedule(quiet_hours=["22:00-06:30", "12:00-13:00"])
    assert schedule.quiet_at(time(23, 0)) and schedule.quiet_at(time(3, 0)) and schedule.quiet_at(time(12, 30))
    assert not schedule.quiet_at(time(6, 30)) and not schedule.quiet_at(time(21, 59))
