"""Datasets from the log: unconsumed signals become demonstration examples, with a replay sample.

- a **correction** gives (the corrected interaction's conversation, the better answer);
- a **demonstration** (``agent.teach``) gives (its prompt, its answer);
- a **positive rating** may promote the agent's own answer to a demonstration (``promote_positive_ratings``).

Only ``pending`` signals are new. The cycle settles them once the gate has decided (``learned`` by an approved
update, ``held`` by a vetoed one, for the operator to retry or dismiss); a failed run leaves them pending for
the next cycle. Replay mixes in examples from ``learned`` signals only, so that a continued adapter keeps what
it learned before, and a vetoed correction never comes back through replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from learners.examples import DemoExample
from runtime.store import Signal, Store


@dataclass
class DatasetBuild:
    """What one learning cycle trains on."""

    new: list[DemoExample]
    """Examples from signals no run has consumed yet."""
    replay: list[DemoExample]
    """Examples from earlier runs' signals."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Signal id -> why it gave no example."""

    @property
    def examples(self) -> list[DemoExample]:
        return self.new + self.replay

    @property
    def signal_ids(self) -> list[str]:
        """The new signals this build used (to mark consumed when the run succeeds)."""
        return [e.source_id for e in self.new if e.source_id]

    def counts(self) -> dict[str, int]:
        return {"new": len(self.new), "replay": len(self.replay), "skipped": len(self.skipped)}


def build_dataset(
    store: Store,
    *,
    promote_positive_ratings: bool = False,
    min_positive_score: float = 1.0,
    replay_fraction: float = 2.0,
    max_new: int | None = None,
    max_per_principal: int | None = None,
    seed: int = 0,
) -> DatasetBuild:
    """Turn the store's unconsumed signals into examples, plus ``replay_fraction`` x as many replayed ones.

    ``max_per_principal`` caps the signals of one sender (oldest first; signals without a principal count as
    one sender); the rest stay pending for a later update."""
    skipped: dict[str, str] = {}
    pending = store.signals(unconsumed_only=True)
    if max_per_principal is not None:
        taken: dict[str | None, int] = {}
        capped = []
        for signal in pending:
            taken[signal.principal] = taken.get(signal.principal, 0) + 1
            if taken[signal.principal] <= max_per_principal:
                capped.append(signal)
        pending = capped
    new = _examples(pending, store, promote_positive_ratings, min_positive_score, skipped)
    if max_new is not None:
        new = new[:max_new]
    learned = store.signals(state="learned")
    earlier = _examples(learned, store, promote_positive_ratings, min_positive_score, {})
    n_replay = min(len(earlier), round(replay_fraction * len(new)))
    replay = random.Random(seed).sample(earlier, n_replay) if n_replay else []
    return DatasetBuild(new=new, replay=replay, skipped=skipped)


def _examples(
    signals: list[Signal],
    store: Store,
    promote_positive_ratings: bool,
    min_positive_score: float,
    skipped: dict[str, str],
) -> list[DemoExample]:
    corrected = {s.interaction_id for s in signals if s.kind == "correction" and s.interaction_id}
    out: list[DemoExample] = []
    for signal in signals:
        if signal.kind == "rating":
            if not promote_positive_ratings:
                continue  # ratings stay for the policy / shadow comparison; not training data
            if signal.rating is None or signal.rating < min_positive_score:
                continue
            if signal.interaction_id in corrected:
                skipped[signal.id] = "the rated interaction was also corrected; the correction wins"
                continue
        example = signal_example(signal, store)
        if isinstance(example, str):
            skipped[signal.id] = example
        else:
            out.append(example)
    return out


def signal_example(signal: Signal, store: Store) -> DemoExample | str:
    """The example a signal gives, or the reason it gives none."""
    prompt = signal.messages
    answer = signal.text
    if signal.interaction_id is not None and (prompt is None or signal.kind == "rating"):
        interaction = store.get_interaction(signal.interaction_id)
        if interaction is None:
            return f"interaction {signal.interaction_id} is not in the store"
        prompt = interaction.messages
        if signal.kind == "rating":
            answer = interaction.response
    if not prompt:
        return "no prompt"
    if not answer or not answer.strip():
        return "empty answer"
    prompt = [dict(m) for m in prompt]
    if prompt[-1].get("role") != "user":
        return "the conversation does not end with a user turn"
    return DemoExample(prompt=prompt, demonstration=answer.strip(), source_id=signal.id)
