"""Answer matching used by the demo, the gate, ``auto`` and the benchmarks: containment, token F1, new content."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

_ARTICLES = {"a", "an", "the"}

TargetMetric = Literal["new_content", "f1", "contains"]

STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been being it its this that these those "
    "as into s do does did has have had will would can could what which who whom whose when where why how".split()
)
"""Function words that carry no answer: they never count as new content."""


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and articles, fold white space (SQuAD-style normalisation)."""
    text = re.sub(r"[^a-z0-9 ]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def contains_answer(response: str, answer: str) -> bool:
    """Normalised answer containment: the normalised answer occurs in the normalised response."""
    target = normalise(answer)
    return bool(target) and f" {target} " in f" {normalise(response)} "


def token_f1(response: str, answer: str) -> float:
    """SQuAD token F1 between the normalised response and answer."""
    pred, gold = normalise(response).split(), normalise(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def content_words(text: str) -> set[str]:
    """The normalised words of `text` that are not function words (what a question is about)."""
    return set(normalise(text).split()) - STOPWORDS


def new_words(reference: str, prompt: str) -> list[str]:
    """What `reference` adds to `prompt`: its normalised words that the prompt lacks, function words excluded.

    For the demonstration "The capital of Draludeli is Halgri." to "What is the capital of Draludeli?" that is
    ``["halgri"]``; for "Russia's capital is Kazan." to "Which city is Russia's capital?", ``["kazan"]``.
    """
    asked = set(normalise(prompt).split())
    return list(dict.fromkeys(w for w in normalise(reference).split() if w not in asked and w not in STOPWORDS))


def new_content_recall(response: str, reference: str, prompt: str) -> float:
    """Share of what the reference adds to the prompt (:func:`new_words`) that the response says.

    Echoing the question ("The capital of Draludeli is Zorvan." to "What is the capital of Draludeli?", taught
    "... is Halgri.") scores 0 here, where its token F1 against the demonstration is 0.83; so does an answer
    that shares only function words with the taught one. A reference that adds nothing falls back to token F1.
    """
    new = new_words(reference, prompt)
    if not new:
        return token_f1(response, reference)
    said = set(normalise(response).split())
    return sum(w in said for w in new) / len(new)


def target_score(metric: TargetMetric, response: str, reference: str, prompt: str) -> float:
    """How well ``response`` gives the taught ``reference`` to ``prompt``, in [0, 1], under ``metric``."""
    if metric == "contains":
        return float(contains_answer(response, reference))
    if metric == "f1":
        return token_f1(response, reference)
    return new_content_recall(response, reference, prompt)


def gives_taught_answer(
    metric: TargetMetric, response: str, reference: str, prompt: Sequence[Mapping[str, Any]], min_score: float
) -> bool:
    """The target check of the gate and ``auto``: does ``response`` to the chat ``prompt`` give the taught answer.

    ``min_score`` applies to ``f1`` and ``new_content``; ``contains`` passes only when the answer appears.
    """
    asked = " ".join(str(m.get("content") or "") for m in prompt)
    return target_score(metric, response, reference, asked) >= (1.0 if metric == "contains" else min_score)
