"""Answer matching used by the demo, the gate and the benchmarks: normalised containment and token F1."""

from __future__ import annotations

import re
from collections import Counter

_ARTICLES = {"a", "an", "the"}


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
