"""The knowledge benchmark (SEAL vs passage-only vs base self-edits) end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.knowledge import load_passages, main, ordering, parse_overrides, sign_test

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
    assert set(written["ordering"]) == {"containment", "f1", "paired_containment"}
    assert set(written["ordering"]["paired_containment"]) == {
        "seal_round_1 > base_self_edits", "base_self_edits > passage_only", "passage_only > base"}
    assert result["summary"] == written["summary"]
    # --rescore rebuilds the orderings and the table from the stored answers alone
    written["ordering"] = {}
    out.write_text(json.dumps(written))
    (out.with_suffix(".md")).unlink()
    rescored = main(["--data", str(data), "--rescore", str(out)])
    assert rescored["ordering"] == result["ordering"]
    assert "Paired, per question" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="not in this file"):
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps(PASSAGES[1]) + "\n")
        main(["--data", str(other), "--rescore", str(out)])


def test_sign_test_counts_discordant_questions_only() -> None:
    first = [True, True, True, False, True, False]
    second = [False, False, False, True, True, False]
    assert sign_test(first, second) == {"only_first": 3, "only_second": 1, "p_two_sided": 0.625}
    assert sign_test([True] * 10, [False] * 10)["p_two_sided"] == 0.002
    assert sign_test([True], [True]) == {"only_first": 0, "only_second": 0, "p_two_sided": 1.0}
