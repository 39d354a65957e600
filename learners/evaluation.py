"""Evaluation of an adapter: did it learn the new facts, and did it keep what the model knew?

- **target**: a fact's direct question and its paraphrases, asked without the fact in context;
- **retention**: reading comprehension with the passage in context (questions the base model can answer
  from the prompt, so a drop means the update damaged a general skill);
- **KL to base**: mean per-token KL(base || tuned) on the retention prompts' base answers.

Accuracy is normalised answer containment (:func:`runtime.textmatch.contains_answer`), greedy decoding.
File formats are those of ``facts_dev.jsonl`` and ``squad_retention_dev.jsonl`` / ``squad_knowledge_dev.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from learners.examples import DemoExample
from runtime.engines import AdapterChoice, SamplingParams, TransformersEngine
from runtime.jsonl import read_jsonl
from runtime.textmatch import contains_answer, token_f1

RC_INSTRUCTION = "Answer the question using the passage. Reply with the answer only."


@dataclass(frozen=True)
class Fact:
    """A fictional fact: what teaches it, and the questions that test it."""

    id: str
    demonstration: str
    question: str
    answer: str
    paraphrases: tuple[str, ...] = ()

    def example(self) -> DemoExample:
        return DemoExample.from_question(self.question, self.demonstration, source_id=self.id)


@dataclass(frozen=True)
class QAItem:
    """A question with its answer, and the passage that holds it (for reading comprehension)."""

    question: str
    answer: str
    context: str | None = None

    def messages(self, *, with_context: bool = True) -> list[dict[str, str]]:
        if with_context and self.context:
            content = f"{RC_INSTRUCTION}\n\nPassage: {self.context}\n\nQuestion: {self.question}"
        else:
            content = self.question
        return [{"role": "user", "content": content}]


def load_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Facts from a JSONL file with ``id, demonstration, question, answer, paraphrases``."""
    facts = []
    for n, row in read_jsonl(path):
        try:
            facts.append(
                Fact(
                    str(row.get("id", n)),
                    row["demonstration"],
                    row["question"],
                    row["answer"],
                    tuple(row.get("paraphrases", ())),
                )
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a fact row (missing {exc})") from None
    return facts[:limit]


def load_questions(path: str | Path, limit: int | None = None) -> list[QAItem]:
    """Questions from a JSONL file of passages (``context``, ``questions``) or of ``{question, answer}`` rows."""
    items: list[QAItem] = []
    for n, row in read_jsonl(path):
        try:
            if "questions" in row:
                items.extend(QAItem(q["question"], q["answer"], row.get("context")) for q in row["questions"])
            else:
                items.append(QAItem(row["question"], row["answer"], row.get("context")))
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{n}: not a question row; expected {{question, answer}} or {{context, questions}} ({exc})"
            ) from None
    return items[:limit]


@dataclass
class Answers:
    """Greedy answers to some questions, scored against their expected answers."""

    responses: list[str]
    correct: list[bool]
    f1: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def mean_f1(self) -> float:
        return sum(self.f1) / len(self.f1) if self.f1 else 0.0


def ask(
    engine: TransformersEngine,
    conversations: Sequence[list[dict[str, str]]],
    answers: Sequence[str],
    adapter: AdapterChoice = None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> Answers:
    """Greedy answers to `conversations` on `adapter` (``None`` = base), scored by containment and F1."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    responses: list[str] = []
    for i in range(0, len(conversations), batch_size):
        batch = list(conversations[i : i + batch_size])
        responses.extend(g.text for g in engine.chat(batch, params, adapter=adapter))
    return Answers(
        responses,
        [contains_answer(r, a) for r, a in zip(responses, answers, strict=True)],
        [token_f1(r, a) for r, a in zip(responses, answers, strict=True)],
    )


def fact_accuracy(
    engine: TransformersEngine, facts: Sequence[Fact], adapter: AdapterChoice = None, **kwargs: int
) -> dict[str, float]:
    """``new_acc`` (direct questions) and ``paraphrase_acc`` of `facts` without them in context."""
    direct = ask(engine, [[{"role": "user", "content": f.question}] for f in facts],
                 [f.answer for f in facts], adapter, **kwargs)
    para_q = [(p, f.answer) for f in facts for p in f.paraphrases]
    para = ask(engine, [[{"role": "user", "content": q}] for q, _ in para_q], [a for _, a in para_q],
               adapter, **kwargs)
    return {"new_acc": direct.accuracy, "paraphrase_acc": para.accuracy if para_q else direct.accuracy}


def retention_accuracy(
    engine: TransformersEngine, items: Sequence[QAItem], adapter: AdapterChoice = None, **kwargs: int
) -> Answers:
    """Reading comprehension with the passage in context."""
    return ask(engine, [it.messages() for it in items], [it.answer for it in items], adapter, **kwargs)


def kl_to_base(
    engine: TransformersEngine,
    items: Sequence[QAItem],
    base_responses: Sequence[str],
    adapter: AdapterChoice,
    *,
    batch_size: int = 8,
) -> float:
    """Mean per-token KL(base || adapter) on the retention prompts followed by the base model's answers."""
    prompts = [engine.render_chat(it.messages()) for it in items]
    values: list[float] = []
    for i in range(0, len(prompts), batch_size):
        values.extend(
            engine.kl_divergence(
                prompts[i : i + batch_size], list(base_responses[i : i + batch_size]), adapter=adapter
            )
        )
    return sum(values) / len(values) if values else 0.0
