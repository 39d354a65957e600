"""Evaluation helpers: file loading, containment scoring and KL to base, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learners.evaluation import QAItem, ask, fact_accuracy, kl_to_base, load_facts, load_questions
from runtime.textmatch import (
    contains_answer,
    gives_taught_answer,
    new_content_recall,
    normalise,
    target_score,
    token_f1,
)


def test_textmatch() -> None:
    assert normalise("The  Capital, of France!") == "capital of france"
    assert contains_answer("It is Paris.", "paris")
    assert not contains_answer("Parisian food", "Paris")  # whole words only
    assert not contains_answer("anything", "")
    assert token_f1("the Denver Broncos", "Denver Broncos") == 1.0
    assert token_f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)


def test_new_content_recall_is_not_fooled_by_echoing_the_question() -> None:
    demo, prompt = "The capital of Draludeli is Halgri.", "What is the capital of Draludeli?"
    echo = "The capital of Draludeli is Zorvan."
    assert token_f1(echo, demo) > 0.8  # what let a candidate that learned nothing pass the old target check
    assert new_content_recall(echo, demo, prompt) == 0.0
    assert new_content_recall("Halgri.", demo, prompt) == 1.0
    assert new_content_recall("It was founded by Kasgri.", "Founded by Kasgri Renkasnor.", "Founded by whom?") == 0.5
    assert new_content_recall("yes", "Paris", "Is it Paris?") == 0.0  # nothing new: token F1 against the answer
    assert target_score("contains", "It is Halgri", "Halgri", prompt) == 1.0
    assert target_score("f1", echo, demo, prompt) == token_f1(echo, demo)
    assert target_score("new_content", echo, demo, prompt) == 0.0
    chat = [{"role": "system", "content": None}, {"role": "user", "content": prompt}]
    assert gives_taught_answer("new_content", "Halgri", demo, chat, 0.5)
    assert not gives_taught_answer("new_content", echo, demo, chat, 0.5)
    assert not gives_taught_answer("contains", "Halgri", demo, chat, 0.0)  # contains ignores min_score


def test_loaders(tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        json.dumps({"id": "f1", "demonstration": "D.", "question": "Q?", "answer": "A", "paraphrases": ["P?"]})
        + "\n\n"
    )
    [fact] = load_facts(facts)
    assert fact.paraphrases == ("P?",) and fact.example().demonstration == "D."
    passages = tmp_path / "p.jsonl"
    passages.write_text(json.dumps({"context": "C", "questions": [{"question": "q", "answer": "a"}] * 3}) + "\n")
    assert len(load_questions(passages)) == 3 and len(load_questions(passages, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_facts(bad)


def test_ask_and_kl_on_tiny_model(tiny_engine, tiny_adapter_dir: Path) -> None:
    items = [QAItem("q1", "x", "passage one"), QAItem("q2", "y", "passage two")]
    base = ask(tiny_engine, [it.messages() for it in items], [it.answer for it in items], None, max_new_tokens=4)
    assert len(base.responses) == 2 and 0.0 <= base.accuracy <= 1.0
    # An answer equal to the model's own output is counted right.
    again = ask(tiny_engine, [items[0].messages()], [base.responses[0] or "zzz"], None, max_new_tokens=4)
    assert again.correct == [bool(base.responses[0].strip())]
    assert kl_to_base(tiny_engine, items, base.responses, None) == pytest.approx(0.0, abs=1e-6)
    tiny_engine.load_adapter("eval-a", tiny_adapter_dir)
    try:
        assert kl_to_base(tiny_engine, items, ["some answer", "other"], "eval-a") > 0
        scores = fact_accuracy(tiny_engine, [], "eval-a")
        assert scores == {"new_acc": 0.0, "paraphrase_acc": 0.0}
    finally:
        tiny_engine.unload_adapter("eval-a")
