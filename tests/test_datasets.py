"""Datasets from the log: which signals become examples, consumption by a run, and replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from learners.datasets import build_dataset
from runtime.store import Store


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "log.duckdb")
    yield s
    s.close()


def _interaction(store: Store, question: str, answer: str) -> str:
    return store.log_interaction([{"role": "user", "content": question}], answer, thread_id="t")


def test_correction_teach_and_rating(store: Store) -> None:
    a = _interaction(store, "Capital of Veloria?", "Nova Haven.")
    b = _interaction(store, "2+2?", "4")
    c = _interaction(store, "Colour of thornwick leaves?", "Green.")
    corr = store.add_signal("correction", interaction_id=a, text="Marenport.")
    demo = store.add_signal("demonstration", text="Ilse Varga.", messages=[{"role": "user", "content": "Who?"}])
    good = store.add_signal("rating", interaction_id=b, rating=1.0)
    store.add_signal("rating", interaction_id=c, rating=-1.0)
    both = store.add_signal("rating", interaction_id=a, rating=1.0)

    plain = build_dataset(store)
    assert {e.source_id for e in plain.new} == {corr, demo}
    by_source = {e.source_id: e for e in plain.new}
    assert by_source[corr].prompt == [{"role": "user", "content": "Capital of Veloria?"}]
    assert by_source[corr].demonstration == "Marenport."
    assert by_source[demo].prompt == [{"role": "user", "content": "Who?"}]

    promoted = build_dataset(store, promote_positive_ratings=True)
    by_source = {e.source_id: e for e in promoted.new}
    assert set(by_source) == {corr, demo, good}
    assert by_source[good].demonstration == "4"  # the agent's own answer
    assert both in promoted.skipped  # rated but also corrected: the correction wins


def test_consumed_signals_are_not_reused_but_replayed(store: Store) -> None:
    ids = [
        store.add_signal("demonstration", text=f"A{i}", messages=[{"role": "user", "content": f"Q{i}"}])
        for i in range(4)
    ]
    first = build_dataset(store)
    assert len(first.new) == 4 and first.replay == []
    run = store.create_run("sdft")
    assert store.mark_consumed(run, signal_ids=first.signal_ids) == 4
    assert all(s.consumed_by_run == run and s.state == "learned" for s in store.signals())

    new = store.add_signal("demonstration", text="B", messages=[{"role": "user", "content": "QB"}])
    new2 = store.add_signal("demonstration", text="C", messages=[{"role": "user", "content": "QC"}])
    second = build_dataset(store, replay_fraction=1.0, seed=3)
    assert [e.source_id for e in second.new] == [new, new2]
    assert len(second.replay) == 2
    assert {e.source_id for e in second.replay} <= set(ids)
    assert second.counts() == {"new": 2, "replay": 2, "skipped": 0}


def test_held_signals_are_neither_new_nor_replayed(store: Store) -> None:
    """A vetoed correction (a poison, say) must not come back through replay or be learned blindly."""
    learned = store.add_signal("demonstration", text="good", messages=[{"role": "user", "content": "Q1"}])
    poison = store.add_signal("demonstration", text="bad", messages=[{"role": "user", "content": "Q2"}])
    store.mark_consumed("r1", signal_ids=[learned])
    assert store.set_learning_state("held", signal_ids=[poison], run_id="r2", reason="vetoed") == 1
    store.add_signal("demonstration", text="new", messages=[{"role": "user", "content": "Q3"}])
    build = build_dataset(store, replay_fraction=5.0)
    assert [e.demonstration for e in build.new] == ["new"]
    assert [e.demonstration for e in build.replay] == ["good"]
    # The operator retries it: pending again, learned by the next cycle.
    assert store.set_learning_state("pending", signal_ids=[poison]) == 1
    assert {e.demonstration for e in build_dataset(store).new} == {"bad", "new"}


def test_unusable_signals_are_skipped_with_reason(store: Store) -> None:
    bad = store.add_signal("correction", interaction_id="missing", text="x")
    assistant_last = store.log_interaction(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "r"
    )
    odd = store.add_signal("correction", interaction_id=assistant_last, text="y")
    build = build_dataset(store)
    assert build.new == []
    assert "not in the store" in build.skipped[bad]
    assert "user turn" in build.skipped[odd]
