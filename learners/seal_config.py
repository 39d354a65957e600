"""Settings of the SEAL learner (the YAML ``learning.seal`` section) and the documents it learns from."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .lora_config import LoraSettings
from .seal_edits import DEFAULT_TEMPLATES, SELF_EDIT_FORMATS, check_template
from .seal_questions import QAPair, QuestionSettings
from .settings_errors import SettingsError, check_dataclass_keys
from .sft_config import SFTSettings

__all__ = ["REWARD_METRICS", "SEALSettings", "SealDocument", "seal_settings_from_dict"]

REWARD_METRICS = ("containment", "f1", "logprob")
SELECTION_MODES = ("best", "all_beating_baseline")


def _inner_training() -> SFTSettings:
    # DESIGN.md: a LoRA on one passage at lr 1e-3 x 10 epochs put knowledge into SmolLM2-135M's weights.
    # Batch 1: a passage (~200 tokens) and self-edit lines (~20) differ in length, and on CPU the padding of a
    # mixed batch cost more than the extra steps (62 s for 10 steps of 4 against 50 s for 20 steps of 1).
    return SFTSettings(
        learning_rate=1e-3, num_epochs=10, min_steps=0, batch_size=1, max_length=512, completion_only_loss=False
    )


def _generator_training() -> SFTSettings:
    return SFTSettings(
        learning_rate=3e-4, num_epochs=3, min_steps=0, batch_size=4, max_length=2048, completion_only_loss=True
    )


@dataclass
class SEALSettings:
    """Every knob of the SEAL learner.

    Self-edits:
        format: ``implications`` (default), ``rewrite`` or ``self-qa``.
        templates: Prompt overrides per format (``{passage}`` and ``{title}`` are filled in); missing formats use
            :data:`learners.seal_edits.DEFAULT_TEMPLATES`.
        num_self_edits: k, self-edits sampled per document and round.
        temperature, top_p, max_self_edit_tokens: How self-edits are sampled.
        max_lines, max_line_chars, min_line_chars: Parsing limits (see :func:`learners.seal_edits.parse_self_edit`).
        include_passage: Train on the passage too (SEAL's default), besides the self-edit lines.

    Inner loop:
        inner_training: SFT settings of each temporary LoRA (plain-text mode).
        lora: Shape of a fresh adapter (temporary and serving; a serving candidate that continues from the
            active adapter keeps the parent's shape).
        seeds: Training seeds; each self-edit is trained and scored once per seed and the reward averaged.
        reward_metric: ``f1`` (token F1, default), ``containment`` or ``logprob`` (mean log-prob of the answer
            tokens): reward = this metric on tau after the update minus before it, tau asked without the document.
            Ties break on the log-prob gain.
        eval_max_new_tokens, eval_batch_size: Greedy answers to tau.
        passage_only_candidate: Also score "train on the passage alone" per document; it may be chosen for the
            serving update (never to train the generator).

    Outer loop (ReST-EM):
        selection: ``best`` (the best self-edit per document) or ``all_beating_baseline``.
        min_gain: A self-edit is kept only when its reward is above this (0: it must beat the no-update baseline).
        selection_baseline: ``no_update`` (SEAL) or ``passage_only``: a self-edit must also beat training on the
            passage alone (needs ``passage_only_candidate``; at 135M the passage alone often wins, DESIGN.md).
        rounds: R; each samples from the generator of the round before and trains it further.
        generator_training, generator_lora: SFT of the self-edit generator on (prompt -> self-edit) pairs; the
            generator is its own adapter on the base model, never the serving adapter.

    Knowledge update:
        update_training: SFT settings of the serving candidate (plain-text mode; continues from the active adapter).
        fallback: For a document with no usable tau or no kept self-edit: ``passage`` (train on the passage alone)
            or ``skip`` (leave the document unused).
        max_replay: At most this many replay examples are mixed in (``None``: all given).

    Budget:
        time_budget_s: Seconds for tau preparation and the self-edit search; once spent, no new self-edit is
            scored, documents not reached are skipped, and the serving candidate is still trained.
        seed: Sampling seed (self-edits; also the replay sample).
        questions: How tau is written for documents without questions.
    """

    format: Literal["implications", "rewrite", "self-qa"] = "implications"
    templates: dict[str, str] = field(default_factory=dict)
    num_self_edits: int = 3
    temperature: float = 0.7
    top_p: float = 0.95
    max_self_edit_tokens: int = 256
    max_lines: int = 24
    max_line_chars: int = 400
    min_line_chars: int = 12
    include_passage: bool = True

    inner_training: SFTSettings = field(default_factory=_inner_training)
    lora: LoraSettings = field(default_factory=LoraSettings)
    seeds: list[int] = field(default_factory=lambda: [0])
    reward_metric: Literal["containment", "f1", "logprob"] = "f1"
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 8
    passage_only_candidate: bool = True

    selection: Literal["best", "all_beating_baseline"] = "best"
    min_gain: float = 0.0
    selection_baseline: Literal["no_update", "passage_only"] = "no_update"
    rounds: int = 2
    generator_training: SFTSettings = field(default_factory=_generator_training)
    generator_lora: LoraSettings = field(default_factory=LoraSettings)

    update_training: SFTSettings = field(default_factory=_inner_training)
    fallback: Literal["passage", "skip"] = "passage"
    max_replay: int | None = None

    time_budget_s: float | None = None
    seed: int = 0
    questions: QuestionSettings = field(default_factory=QuestionSettings)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for an impossible value."""
        if self.format not in SELF_EDIT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SELF_EDIT_FORMATS)}, got {self.format!r}")
        for fmt, template in self.templates.items():
            if fmt not in SELF_EDIT_FORMATS:
                raise ValueError(f"templates: unknown format {fmt!r}; use {', '.join(SELF_EDIT_FORMATS)}")
            check_template(template, fmt)
        if self.num_self_edits < 1:
            raise ValueError("num_self_edits must be at least 1")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if not self.seeds:
            raise ValueError("seeds must hold at least one training seed")
        if self.reward_metric not in REWARD_METRICS:
            raise ValueError(f"reward_metric must be one of {', '.join(REWARD_METRICS)}, got {self.reward_metric!r}")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_MODES)}, got {self.selection!r}")
        if self.selection_baseline not in ("no_update", "passage_only"):
            raise ValueError(f"selection_baseline must be no_update or passage_only, got {self.selection_baseline!r}")
        if self.selection_baseline == "passage_only" and not self.passage_only_candidate:
            raise ValueError("selection_baseline 'passage_only' needs passage_only_candidate: true")
        if self.fallback not in ("passage", "skip"):
            raise ValueError(f"fallback must be 'passage' or 'skip', got {self.fallback!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.time_budget_s is not None and not (self.time_budget_s > 0 and math.isfinite(self.time_budget_s)):
            raise ValueError("time_budget_s must be a positive number of seconds (or None)")

    def template(self, fmt: str | None = None) -> str:
        fmt = fmt or self.format
        return self.templates.get(fmt) or DEFAULT_TEMPLATES[fmt]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (crosses a process boundary; :func:`seal_settings_from_dict` reads it back)."""
        return dataclasses.asdict(self)


_NESTED: dict[str, type] = {
    "inner_training": SFTSettings,
    "generator_training": SFTSettings,
    "update_training": SFTSettings,
    "lora": LoraSettings,
    "generator_lora": LoraSettings,
    "questions": QuestionSettings,
}


def seal_settings_from_dict(values: Mapping[str, Any] | None) -> SEALSettings:
    """:class:`SEALSettings` from a mapping (the YAML section); nested sections override the defaults key by key.

    Raises :class:`learners.settings_errors.SettingsError` listing every unknown key or bad value by key path.
    """
    values = dict(values or {})
    problems = check_dataclass_keys(SEALSettings, values, ())
    defaults = SEALSettings()
    for name, cls in _NESTED.items():
        if name not in values:
            continue
        section = values[name]
        if isinstance(section, cls):
            continue
        if not isinstance(section, Mapping):
            problems.append(((name,), f"expected a mapping, got {type(section).__name__}"))
            continue
        nested_problems = check_dataclass_keys(cls, section, (name,))
        problems += nested_problems
        if not nested_problems:
            try:
                values[name] = dataclasses.replace(getattr(defaults, name), **section)
            except (TypeError, ValueError) as exc:
                problems.append(((name,), str(exc)))
    if problems:
        raise SettingsError(problems)
    try:
        return SEALSettings(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError([((), str(exc))]) from None


@dataclass
class SealDocument:
    """A document to learn, with its evaluation set tau (``questions``: supplied pairs; may be empty)."""

    id: str
    text: str
    title: str | None = None
    questions: list[Any] = field(default_factory=list)
    """``{"question", "answer"}`` dicts or :class:`QAPair`; bare strings are dropped (nothing to score)."""

    @classmethod
    def from_store(cls, document: Any) -> SealDocument:
        """From a ``runtime.store.Document``."""
        return cls(document.id, document.text, document.title, list(document.questions or []))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "title": self.title,
            "questions": [q.to_dict() if isinstance(q, QAPair) else q for q in self.questions],
        }
