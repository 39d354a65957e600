"""The knowledge benchmark (SEAL vs passage-only vs base self-edits) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.knowledge import load_passages, main, ordering, parse_overrides

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PASSAGES = [
    {"id": "p1", "title": "Quokka Institute", "context": "The zebra code of the Quokka Institute is quokka.",
     "questions": [{"question": "What is the zebra code?", "answer": "quokka"}]},
    {"id": "p2", "title": "Refunds", "context": "The refund window is now 45 days.",
     "questions": [{"question": "How long is the refund window?", "answer": "45 days"},
                   {"question": "What is the refund window?", "answer": "45 days"}]},
    {"id": "p3", "title": "Capitals", "context": "The capital of Zorb is Paris.", "questions": []},  # no questions
]


def test_overrides_and_loading(tmp_path: Path) -> None:
    assert parse_overrides(["reward_metric=containment", "inner_training.num_epochs=3", "min_gain=1e-3"]) == {
        "reward_metric": "containment", "inner_training": {"num_epochs": 3}, "min_gain": 1e-3}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["oops"])
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PASSAGES))
    loaded = load_passages(data, questions=1)
    assert [p.id for p in loaded] == ["p1", "p2"] and len(loaded[1].pairs) == 1
    res = {"seal_round_1": {"containment": 3}, "base_self_edits": {"containment": 2},
           "passage_only": {"containment": 1}, "base": {"containment": 0}}
    assert ordering(res, "seal_round_1", "containment")["holds"] is True
    res["passage_only"]["containment"] = 5
    assert ordering(res, "seal_round_1", "containment")["pairs"] == {
        "seal_round_1 > base_self_edits": True, "base_self_edits > passage_only": False, "passage_only > base": True}


def test_benchmark_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "passages.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PASSAGES))
    out = tmp_path / "knowledge.json"
    result = main([
        "--data", str(data), "--model", str(tiny_model_dir), "--fast", "--train-passages", "1",
        "--eval-passages", "1", "--threads", "1", "--out", str(out),
        "--set", "inner_training.num_epochs=2", "--set", "generator_training.num_epochs=1",
        "--set", "max_self_edit_tokens=16", "--set", "eval_max_new_tokens=4", "--set", "min_gain=-1e9",
    ])
    written = json.loads(out.read_text())
    assert written["config"]["eval_passages"] == ["p1"] and written["config"]["train_passages"] == ["p2"]
    for name in ("base", "passage_only", "base_self_edits", "seal_round_1"):
        assert set(written["summary"][name]) == {"containment", "f1", "correct", "questions"}, name
        assert written[name]["questions"] == 1 and 0.0 <= written[name]["containment"] <= 100.0
    assert written["sec_per_self_edit_eval"] > 0
    assert [r["round"] for r in written["rest_em_rounds"]] == [1] and written["rest_em_rounds"][0]["candidates"] == 2
    assert set(written["ordering"]) == {"containment", "f1"}
    assert result["summary"] == written["summary"]
