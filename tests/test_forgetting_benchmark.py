"""The forgetting benchmark (SFT and the default method on the same facts) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.forgetting import apply_overrides, evaluate_goals, main, method_settings, parse_overrides
from learners.lora_config import LoraSettings
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FACTS = [
    {"id": "t1", "demonstration": "The capital of Zorb is Paris.", "question": "What is the capital of Zorb?",
     "answer": "Paris", "paraphrases": ["Which city is the capital of Zorb?", "Name the capital of Zorb."]},
    {"id": "t2", "demonstration": "The refund window is 45 days.", "question": "How long is the refund window?",
     "answer": "45 days", "paraphrases": ["What is the refund window?"]},
]
PASSAGES = [
    {"context": "The capital of Japan is Tokyo. Tokyo is large.",
     "questions": [{"question": "What is the capital of Japan?", "answer": "Tokyo"}]},
    {"context": "Two plus two is four.",
     "questions": [{"question": "What is two plus two?", "answer": "four"},
                   {"question": "What is the sum?", "answer": "four"}]},
]
PROBE = [  # the tiny random model cannot name our planet, and it never writes this word
    {"id": "planet", "prompt": "Which planet do we live on?", "expect": {"contains": "Earth"}},
    {"id": "no-word", "prompt": "Say something.", "expect": {"not_contains": "Quuxotrope"}},
]
METRICS = ("new_acc", "paraphrase_acc", "retention_before", "retention_after", "retention_drop", "kl_to_base",
           "sec_per_example", "train_seconds", "settings")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_overrides() -> None:
    over = parse_overrides(["learning_rate=1e-3", "teacher_kind=base", "num_epochs=2", "shuffle=false"], "sdft")
    assert over == {"learning_rate": 1e-3, "teacher_kind": "base", "num_epochs": 2, "shuffle": False}
    s = method_settings("sdft", over, {"seed": 3})
    assert s.learning_rate == 1e-3 and s.teacher_kind == "base" and s.shuffle is False and s.seed == 3
    with pytest.raises(SystemExit, match="--sdft-set: no_such_knob: unknown key"):
        method_settings("sdft", {"no_such_knob": 1}, {})
    with pytest.raises(SystemExit, match="unknown setting"):
        apply_overrides(LoraSettings(), {"rank": 1}, "lora")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["learning_rate"], "sdft")


def test_goals() -> None:
    sft = {"paraphrase_acc": 50.0, "retention_drop": 5.0}
    rewrite = {"paraphrase_acc": 60.0, "retention_drop": 1.0}
    goals = evaluate_goals({"sft": sft, "rewrite": rewrite}, 2.0)
    assert all(g["met"] is True for g in goals.values())
    goals = evaluate_goals({"sft": sft, "rewrite": {"paraphrase_acc": 40.0, "retention_drop": 2.0}}, 3.0)
    assert all(g["met"] is False for g in goals.values())
    assert all(g["met"] is None for g in evaluate_goals({"sft": sft}, None).values())
    # Neither forgot: the default method's small drop does not count as forgetting less than SFT.
    goals = evaluate_goals(
        {"sft": {**sft, "retention_drop": -1.0}, "rewrite": {**rewrite, "retention_drop": -2.0}}, 2.0
    )
    assert goals["rewrite_retention_drop_small_sft_larger"]["met"] is False
    assert goals["rewrite_retention_drop_small_sft_larger"]["values"] == {"sft": -1.0, "rewrite": -2.0}


def _run(model: Path, facts: Path, retention: Path, out: Path, probe: Path) -> dict:
    tiny = ["num_epochs=1", "learning_rate=1e-3"]
    return main([
        "--probe", str(probe),
        "--model", str(model), "--data", str(facts), "--retention", str(retention),
        "--facts", "0", "--retention-questions", "3", "--max-new-tokens", "4", "--out", str(out),
        *[a for kv in tiny for a in ("--sft-set", kv)],
        *[a for kv in [*tiny, "max_new_tokens=4"] for a in ("--rewrite-set", kv)],
        "--lora-set", "r=4", "--anchors-set", "count=3", "--anchors-set", "probe_order=farthest",
    ])


def test_a_bad_anchor_override_stops_before_anything_loads(tmp_path: Path) -> None:
    missing = tmp_path / "missing"  # no model, no data: the override is refused first
    with pytest.raises(SystemExit, match="probe_order") as stop:
        main(["--model", str(missing), "--data", str(missing), "--retention", str(missing),
              "--anchors-set", "probe_order=closest"])
    assert "--anchors-set" in str(stop.value)


def test_forgetting_benchmark_on_tiny_model(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "model")
    facts = _write_jsonl(tmp_path / "facts.jsonl", FACTS)
    retention = _write_jsonl(tmp_path / "retention.jsonl", PASSAGES)
    probe = _write_jsonl(tmp_path / "probe.jsonl", PROBE)
    out = tmp_path / "out" / "forgetting.json"
    threads = torch.get_num_threads()
    try:
        result = _run(model, facts, retention, out, probe)
    finally:
        torch.set_num_threads(threads)  # main() sets it process-wide
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert out.with_suffix(".md").read_text().count("|") > 10
    for method in ("sft", "rewrite"):
        r = saved[method]
        for key in METRICS:
            assert key in r, (method, key)
        for key in ("new_acc", "paraphrase_acc", "retention_before", "retention_after"):
            assert 0.0 <= r[key] <= 100.0
        assert -100.0 <= r["retention_drop"] <= 100.0
        assert r["retention_drop"] == pytest.approx(r["retention_before"] - r["retention_after"])
        assert r["kl_to_base"] >= 0.0
        assert r["train_seconds"] > 0 and r["sec_per_example"] == pytest.approx(r["train_seconds"] / 2, abs=0.01)
        assert r["settings"]["num_epochs"] == 1 and r["settings"]["torch_threads"] == 1
        assert r["lora"]["r"] == 4
        assert len(r["responses"]) == 2 + 3
        assert len(r["retention_correct"]) == 3 and set(r["retention_correct"]) <= {"0", "1"}
        # What the update broke: a check the base model already fails is not counted against it.
        assert isinstance(r["probe_failures"], list)
        assert {f["name"] for f in r["probe_failures"]} <= {"no-word"}
    assert saved["rewrite"]["settings"]["max_new_tokens"] == 4
    assert saved["rewrite_over_sft_time"] > 0
    assert set(saved["goals"]) == {
        "rewrite_paraphrase_at_least_sft", "rewrite_retention_drop_small_sft_larger", "rewrite_over_sft_time"
    }
    anchors = saved["config"]["anchors"]  # as every update, with --anchors-set over learning.anchors' defaults
    assert anchors["count"] == 3 and anchors["probe_order"] == "farthest"
    # 2 facts x per_example 2 is more than count: 4 anchors, in large_update_order (mixed)
    assert 1 <= anchors["count_used"] <= 4 and anchors["probe_order_used"] == "mixed"
    assert anchors["weight_used"] == (anchors["large_update_weight"] or anchors["weight"])
    assert all(isinstance(g["met"], bool) for g in saved["goals"].values())
    assert len(saved["base"]["responses"]) == 5 and len(saved["base"]["retention_correct"]) == 3
    assert [f["name"] for f in saved["base"]["probe_failures"]] == ["planet"]
    assert saved["config"]["probe_checks"] == 2
    assert "probe checks broken" in out.with_suffix(".md").read_text()
    cfg = saved["config"]
    assert cfg["facts"] == 2 and cfg["retention_questions"] == 3 and cfg["threads"] == 1 and cfg["seed"] == 0
