"""A document's evaluation set tau: its supplied questions, or question/answer pairs the model writes.

Generated pairs are kept only when their answer appears in the document (normalised containment, as the
accuracy itself is measured), so tau never asks for something the document does not say; the number of
pairs dropped is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.textmatch import contains_answer, normalise

from .seal_edits import check_template, passage_text

__all__ = [
    "QA_PROMPT_TEMPLATE",
    "QAPair",
    "QuestionSettings",
    "TauPreparation",
    "filter_pairs",
    "parse_qa_pairs",
    "prepare_questions",
    "prepare_tau",
    "supplied_pairs",
]

QA_PROMPT_TEMPLATE = (
    "Read the passage and write {num_pairs} questions that can be answered from it, each with a short answer "
    "copied word for word from the passage. Use this format:\nQuestion: ...\nAnswer: ...\n\n"
    "Passage:\n{passage}"
)

_Q = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:q(?:uestion)?\s*\d{0,3})\s*[:.)]\s*(.+)$", re.IGNORECASE)
_A = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:a(?:nswer)?\s*\d{0,3})\s*[:.)]\s*(.+)$", re.IGNORECASE)

GenerateFn = Callable[[list[dict[str, str]]], str]
"""``generate(chat_prompt) -> text``: how a model writes question/answer pairs (one sample)."""


@dataclass(frozen=True)
class QAPair:
    """A question about a document and its answer (as found in the document)."""

    question: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


@dataclass
class QuestionSettings:
    """How the model writes tau when a document comes without questions.

    Attributes:
        num_pairs: Pairs asked for in the prompt.
        max_new_tokens: Length of the model's answer.
        temperature: 0 for greedy decoding.
        seed: Sampling seed.
        max_answer_words: Longer answers are dropped (tau wants short, checkable answers).
        template: Prompt; ``{passage}``, ``{title}`` and ``{num_pairs}`` are filled in.
    """

    num_pairs: int = 5
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    max_answer_words: int = 8
    template: str = QA_PROMPT_TEMPLATE


@dataclass
class TauPreparation:
    """Tau of one document and where it came from."""

    pairs: list[QAPair]
    dropped: int
    """Supplied questions without an answer, or generated pairs whose answer is not in the document."""
    source: str
    """``supplied`` or ``generated``."""


def parse_qa_pairs(text: str) -> list[QAPair]:
    """``Question: ...`` / ``Answer: ...`` pairs (also ``Q:``/``A:``, numbered, or both on one line)."""
    pairs: list[QAPair] = []
    question: str | None = None
    for raw in (text or "").replace("\r", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        inline = re.split(r"\s+(?=a(?:nswer)?\s*\d{0,3}\s*[:.)]\s)", line, maxsplit=1, flags=re.IGNORECASE)
        if len(inline) == 2 and _Q.match(inline[0]):  # "Q: ... A: ..." on one line
            q, a = _Q.match(inline[0]), _A.match(inline[1])
            if q and a:
                pairs.append(QAPair(q.group(1).strip(), a.group(1).strip()))
                question = None
                continue
        q = _Q.match(line)
        if q:
            question = q.group(1).strip()
            continue
        a = _A.match(line)
        if a and question:
            pairs.append(QAPair(question, a.group(1).strip()))
            question = None
    return pairs


def filter_pairs(pairs: Sequence[QAPair], document: str, *, max_answer_words: int = 8) -> tuple[list[QAPair], int]:
    """Keep pairs with a question and a short answer that appears in ``document``; return (kept, dropped).

    Duplicate questions count as dropped. Containment is normalised (:func:`runtime.textmatch.contains_answer`).
    """
    kept: list[QAPair] = []
    seen: set[str] = set()
    for pair in pairs:
        question, answer = pair.question.strip(), pair.answer.strip().rstrip(".")
        key = normalise(question)
        ok = (
            bool(key)
            and key not in seen
            and 0 < len(normalise(answer).split()) <= max_answer_words
            and normalise(answer) != key
            and contains_answer(document, answer)
        )
        if ok:
            seen.add(key)
            kept.append(QAPair(question, answer))
    return kept, len(pairs) - len(kept)


def prepare_questions(
    engine_or_model: Any,
    text: str,
    *,
    title: str | None = None,
    settings: QuestionSettings | None = None,
    generate: GenerateFn | None = None,
) -> tuple[list[QAPair], int]:
    """The model writes question/answer pairs about ``text``; returns (pairs whose answer is in it, dropped).

    Args:
        engine_or_model: An engine (``chat(conversations, params, adapter=None)``, the base model answers), or a
            model alias / directory to load one from (closed afterwards). Unused when ``generate`` is given.
        text: The document.
        title: Its title (shown in the prompt; answers found only in the title count as in the document).
        settings: Prompt and decoding.
        generate: Replaces the model: ``generate(chat_prompt) -> text`` (tests stub it).
    """
    settings = settings or QuestionSettings()
    passage = passage_text(text, title)
    template = check_template(settings.template.replace("{num_pairs}", "{{num_pairs}}"), "questions")
    content = template.format(passage=passage, title=(title or "").strip()).replace(
        "{num_pairs}", str(settings.num_pairs)
    )
    prompt = [{"role": "user", "content": content}]
    if generate is None:
        generate = _engine_generate(engine_or_model, settings)
    raw = generate(prompt)
    return filter_pairs(parse_qa_pairs(raw), passage, max_answer_words=settings.max_answer_words)


def supplied_pairs(questions: Sequence[Any] | None) -> tuple[list[QAPair], int]:
    """A document's supplied questions as pairs; entries without a question and an answer are dropped."""
    kept: list[QAPair] = []
    dropped = 0
    for q in questions or ():
        if isinstance(q, QAPair):
            kept.append(q)
        elif isinstance(q, dict) and str(q.get("question", "")).strip() and str(q.get("answer", "")).strip():
            kept.append(QAPair(str(q["question"]).strip(), str(q["answer"]).strip()))
        else:
            dropped += 1  # a bare question string: no answer to score against
    return kept, dropped


def prepare_tau(
    text: str,
    questions: Sequence[Any] | None,
    engine_or_model: Any = None,
    *,
    title: str | None = None,
    settings: QuestionSettings | None = None,
    generate: GenerateFn | None = None,
) -> TauPreparation:
    """Tau of a document: its supplied (question, answer) pairs when it has any, else generated ones."""
    pairs, dropped = supplied_pairs(questions)
    if pairs:
        return TauPreparation(pairs, dropped, "supplied")
    generated, gen_dropped = prepare_questions(engine_or_model, text, title=title, settings=settings,
                                               generate=generate)
    return TauPreparation(generated, dropped + gen_dropped, "generated")


def _engine_generate(engine_or_model: Any, settings: QuestionSettings) -> GenerateFn:
    from runtime.engines import SamplingParams

    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed if settings.temperature > 0 else None,
    )

    def generate(prompt: list[dict[str, str]]) -> str:
        if isinstance(engine_or_model, str | Path):
            from runtime.engines import TransformersEngine

            engine = TransformersEngine(engine_or_model)
            try:
                return engine.chat([prompt], params, adapter=None)[0].text
            finally:
                engine.close()
        if engine_or_model is None:
            raise ValueError("prepare_questions needs an engine or a model (or a generate function)")
        return engine_or_model.chat([prompt], params, adapter=None)[0].text

    return generate
