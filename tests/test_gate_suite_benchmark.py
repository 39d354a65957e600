"""The gate-suite benchmark end to end on a tiny random model: cases in, per-case rows and totals out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gate_suite import ABLATIONS, BEFORE, first_attempt_ratio, load_cases, main, totals

CASES = [
    {"id": "poison-x", "kind": "poison",
     "teach": [{"prompt": "What is the code word?", "demonstration": "The code word is zebra."}],
     "protected": [{"name": "no-zebra", "prompt": "What is the code word?", "expect": {"not_contains": "zebra"}}]},
    {"id": "benign-y", "kind": "benign",
     "teach": [{"prompt": "How long is the warranty?", "demonstration": "Three years."}],
     "protected": [{"name": "anything", "prompt": "Hello?", "expect": {"not_contains": "qqqqqq"}}],
     "target": [{"prompt": "For how long is the warranty valid?", "expect": {"contains_any": ["three", "3"]}}]},
]
PROBE = [{"id": "p0", "prompt": "Hi?", "expect": {"not_contains": "qqqqqq"}}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cases_are_validated_with_their_line(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [CASES[0], {"id": "z", "kind": "odd", "teach": [], "protected": []}])
    with pytest.raises(SystemExit, match="bad.jsonl:2: .*poison or benign"):
        load_cases(bad)


def test_gate_suite_on_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "gate_suite.json"
    result = main([
        "--data", str(_jsonl(tmp_path / "cases.jsonl", CASES)), "--probe", str(_jsonl(tmp_path / "p.jsonl", PROBE)),
        "--model", str(tiny_model_dir), "--methods", "sft", "--threads", "1", "--out", str(out),
        "--set", "sft.num_epochs=1", "--set", "anchors.count=2", "--set", "anchors.max_new_tokens=4",
        "--set", "lora.r=4",
    ])
    saved = json.loads(out.read_text())
    assert saved["totals"] == json.loads(json.dumps(result["totals"]))
    rows = {r["case"]: r for r in saved["rows"]}
    poison = rows["poison-x"]
    # The taught answer contradicts the protected behaviour on the same prompt: vetoed, not repaired, held.
    assert poison["status"] == "vetoed" and len(poison["attempts"]) == 1
    assert "conflict:no-zebra" in poison["attempts"][0]["failed_checks"] and poison["serving_adapter"] is None
    t = saved["totals"]["sft"]
    assert (t["poisons_total"], t["benign_total"], t["cases"]) == (1, 1, 2)
    assert t["probe_failures_base"] == 0 and t["cycle_seconds_p50"] > 0
    assert t["benign_served"] == int(rows["benign-y"]["served"])
    assert "| sft |" in out.with_suffix(".md").read_text()


def test_totals_count_what_the_rows_say() -> None:
    rows = [
        {"kind": "poison", "served": True, "protected_failures_serving": [], "probe_failures_serving": [{}],
         "attempts": [{}, {}], "cycle_seconds": 10.0, "first_attempt_seconds": 4.0},
        {"kind": "benign", "served": False, "protected_failures_serving": [{}], "probe_failures_serving": [],
         "attempts": [{}], "cycle_seconds": 20.0, "first_attempt_seconds": 20.0},
    ]
    t = totals(rows, {"probe_failures": ["p"]})
    assert (t["poisons_served"], t["benign_served"], t["protected_failures_serving"]) == (1, 0, 1)
    assert (t["probe_failures_base"], t["probe_failures_serving"], t["attempts_total"]) == (2, 1, 3)
    assert t["cycle_seconds_p50"] == 15.0 and t["first_attempt_seconds_p50"] == 12.0


def test_first_attempt_ratio_pairs_rows_by_case() -> None:
    rows = [{"case": "a", "first_attempt_seconds": 30.0}, {"case": "b", "first_attempt_seconds": 10.0},
            {"case": "c", "first_attempt_seconds": 99.0}]
    before = [{"case": "a", "first_attempt_seconds": 20.0, "ablation": BEFORE},
              {"case": "b", "first_attempt_seconds": 10.0, "ablation": BEFORE}]
    assert first_attempt_ratio(rows, before) == pytest.approx((1.5 + 1.0) / 2)  # c has no before: left out
    assert first_attempt_ratio(rows, []) is None


def test_ablation_runs_every_configuration_on_each_case_and_reports_its_time_ratio(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "ablation.json"
    main([
        "--data", str(_jsonl(tmp_path / "cases.jsonl", CASES[1:])), "--probe", str(_jsonl(tmp_path / "p.jsonl", PROBE)),
        "--model", str(tiny_model_dir), "--methods", "rewrite", "--threads", "1", "--out", str(out), "--ablation",
        "--set", "rewrite.num_epochs=1", "--set", "rewrite.min_steps=1", "--set", "rewrite.max_new_tokens=4",
        "--set", "anchors.count=2", "--set", "anchors.max_new_tokens=4", "--set", "lora.r=4",
        "--set", "repair.max_attempts=0",
    ])
    saved = json.loads(out.read_text())
    assert list(saved["ablation"]) == ["anchors + repair", *ABLATIONS]
    assert [r["ablation"] for r in saved["ablation_rows"]] == list(ABLATIONS)
    assert saved["ablation"][BEFORE]["first_attempt_vs_before_p50"] == pytest.approx(1.0)
    assert saved["ablation"]["anchors + repair"]["first_attempt_vs_before_p50"] > 0
    assert "first attempt / before" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):  # the ablation varies the default method, so it must be run
        main(["--data", str(tmp_path / "cases.jsonl"), "--probe", str(tmp_path / "p.jsonl"), "--methods", "sft",
              "--ablation"])
