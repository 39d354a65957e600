"""The learning policy: what an update must not break, how it is promoted, and when learning runs.

A policy is a YAML file (see ``examples/policies/``) validated by these pydantic models; the JSON schema
is :func:`policy_schema` (``runtime policy schema``). Every section has defaults, so an empty file is a
valid policy that protects nothing and promotes directly.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from learners.registry import LEARNING_METHODS
from policies.safe_regex import check_pattern
from runtime.strict_fields import StrictSection
from runtime.textmatch import TargetMetric

DEFAULT_REFUSAL_MARKERS: tuple[str, ...] = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "i'm sorry",
    "i am sorry",
    "sorry, but",
    "not able to help",
    "can't help",
    "cannot help",
    "can't assist",
    "cannot assist",
    "not appropriate",
    "against my",
    "i must decline",
    "i decline",
)
"""Phrases that mark an answer as a refusal (case-insensitive), for the ``refuses`` expectation."""


class _Section(StrictSection):
    """A policy section: values as written (:class:`runtime.strict_fields.StrictSection`)."""


class Message(_Section):
    role: Literal["system", "user", "assistant"]
    content: str


class Expectation(_Section):
    """What an answer must satisfy. Every key that is set must hold (at least one must be set)."""

    contains: str | list[str] | None = Field(None, description="Every one of these substrings must appear.")
    contains_any: list[str] | None = Field(
        None, min_length=1, description="At least one of these substrings must appear."
    )
    not_contains: str | list[str] | None = Field(None, description="None of these substrings may appear.")
    regex: str | None = Field(
        None, description="The answer must match this regular expression (searched, with a time limit; see "
        "policies.safe_regex)."
    )
    equals: str | None = Field(None, description="The answer, stripped, must equal this.")
    refuses: bool | None = Field(
        None, description="true: the answer must be a refusal; false: it must not be one (see refusal_markers)."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="The answer must be JSON (optionally in a ``` block) valid against this schema."
    )
    json_keys: list[str] | None = Field(
        None, min_length=1,
        description="The answer must hold a JSON object (whole, in a ``` block, or the outermost {...}) with these "
        "keys.",
    )
    max_kl_to_base: float | None = Field(
        None, ge=0.0, description="Mean per-token KL(base || adapter) on the base model's answer must not exceed this."
    )
    case_sensitive: bool = Field(False, description="For contains, contains_any, not_contains and equals.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            check_pattern(value)
        return value

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        return value

    @model_validator(mode="after")
    def _something_expected(self) -> Expectation:
        if not self.keys():
            raise ValueError(
                "set at least one of contains, contains_any, not_contains, regex, equals, refuses, json_schema, "
                "json_keys, max_kl_to_base"
            )
        return self

    def keys(self) -> list[str]:
        """The expectation kinds that are set, in a fixed order."""
        kinds = (
            "contains", "contains_any", "not_contains", "regex", "equals", "refuses", "json_schema", "json_keys",
            "max_kl_to_base",
        )
        return [k for k in kinds if getattr(self, k) is not None]


class ProtectedBehaviour(_Section):
    """A prompt whose answer must keep meeting an expectation after every update."""

    name: str = Field(..., min_length=1)
    prompt: str | None = Field(None, description="A single user message (or give `messages`).")
    messages: list[Message] | None = Field(None, description="A conversation ending with a user turn.")
    expect: Expectation
    max_new_tokens: int = Field(96, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_input(self) -> ProtectedBehaviour:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("`messages` must end with a user message")
        return self

    def conversation(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class RetentionSuite(_Section):
    """A question set the update must not get worse at (beyond `max_drop` points)."""

    name: str = Field(..., min_length=1)
    file: str = Field(
        ...,
        description="JSONL: passages (`context`, `questions: [{question, answer}]`) or rows `{question, answer}`. "
        "Relative to the policy file.",
    )
    metric: Literal["accuracy", "f1"] = Field("accuracy", description="Answer containment, or token F1 (x100).")
    max_drop: float = Field(5.0, ge=0.0, description="Points the candidate may lose against the active adapter.")
    questions: int | None = Field(None, ge=1, description="Use the first N questions (default: all).")
    with_context: bool = Field(True, description="Put a passage's text in the prompt (reading comprehension).")
    max_new_tokens: int = Field(32, ge=1, le=1024)


class TargetChecks(_Section):
    """What was just taught must now pass: each new example's prompt, answered by the candidate."""

    enabled: bool = True
    metric: TargetMetric = Field(
        "new_content",
        description="new_content: the answer says what the taught answer adds to the prompt (its tokens not in "
        "the prompt), so echoing the question does not pass; f1: token F1 of the answer against the taught answer; "
        "contains: the taught answer appears.",
    )
    min_recall: float = Field(
        0.5, ge=0.0, le=1.0, description="An example passes when it says at least this share of the new content."
    )
    min_f1: float = Field(0.5, ge=0.0, le=1.0, description="An example passes at or above this F1 (metric f1).")
    min_pass_rate: float = Field(0.5, ge=0.0, le=1.0, description="Fraction of new examples that must pass.")
    max_examples: int = Field(32, ge=1, description="Check at most this many new examples.")
    max_new_tokens: int = Field(64, ge=1, le=4096)


class Promotion(_Section):
    mode: Literal["direct", "shadow", "manual"] = Field(
        "direct",
        description="direct: an approved candidate serves at once; shadow: it answers mirrored traffic first; "
        "manual: it waits for `runtime adapters promote NAME`.",
    )


class ShadowCriteria(_Section):
    """How a shadow adapter is exercised and judged."""

    fraction: float = Field(0.2, ge=0.0, le=1.0, description="Share of live requests mirrored to the shadow.")
    queue_size: int = Field(32, ge=1, description="Mirrored requests waiting at most; more are dropped.")
    max_new_tokens: int | None = Field(None, ge=1, description="Cap on mirrored answers (default: the live one's).")
    min_pairs: int = Field(20, ge=1, description="Compared pairs needed before deciding.")
    max_pairs: int = Field(500, ge=1, description="Retire a shadow that has not qualified after this many pairs.")
    min_agreement: float = Field(
        0.3, ge=0.0, le=1.0, description="Mean token F1 between shadow and live answers needed to promote."
    )
    checks: list[Expectation] = Field(
        default_factory=list,
        description="Rules every answer must meet (e.g. not_contains, regex, json_schema), checked on both answers "
        "of each pair; max_kl_to_base is not allowed here.",
    )
    max_extra_violations: int = Field(
        0, ge=0, description="Retire if the shadow breaks the rules this many more times than live did, plus one."
    )
    max_regression_rate: float = Field(
        0.2, ge=0.0, le=1.0,
        description="Retire if, among live answers rated positively, more than this share got a shadow answer "
        "that disagrees with them (F1 < 0.5).",
    )

    @field_validator("checks")
    @classmethod
    def _answer_only(cls, value: list[Expectation]) -> list[Expectation]:
        if any(e.max_kl_to_base is not None for e in value):
            raise ValueError("max_kl_to_base needs the base model's answer; use it in `protected`, not shadow checks")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> ShadowCriteria:
        if self.max_pairs < self.min_pairs:
            raise ValueError(f"max_pairs ({self.max_pairs}) must be at least min_pairs ({self.min_pairs})")
        return self


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Schedule(_Section):
    """When the background loop runs a learning cycle."""

    interval_s: float | None = Field(
        600.0, ge=0.1, description="Seconds between checks, at least 0.1 (ignored when cron is set)."
    )
    cron: str | None = Field(None, description="Standard 5-field crontab expression, e.g. '*/15 * * * *'.")
    min_new_signals: int = Field(
        4, ge=1, description="Unconsumed corrections and taught answers (or documents, for seal) needed to learn."
    )
    quiet_hours: list[str] = Field(
        default_factory=list, description="Local time ranges 'HH:MM-HH:MM' (may wrap midnight) with no learning."
    )
    method: str | None = Field(
        None,
        description=f"Learning method for scheduled cycles ({', '.join(LEARNING_METHODS)}; default: the config's "
        "learning.method).",
    )
    timeout_s: float | None = Field(3600.0, gt=0, description="Time budget of one cycle's training.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        if value is not None and value not in LEARNING_METHODS:
            raise ValueError(f"unknown learning method {value!r}; use one of {', '.join(LEARNING_METHODS)}")
        return value

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                trigger = CronTrigger.from_crontab(value, timezone=UTC)
            except ValueError as exc:
                raise ValueError(f"not a valid crontab expression: {exc}") from None
            if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
                raise ValueError(f"the crontab expression {value!r} never fires (no such date)")
        return value

    @field_validator("quiet_hours")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _HHMM.match(item):
                raise ValueError(f"quiet hours must look like '22:00-06:30', got {item!r}")
        return value

    def quiet_at(self, now: time) -> bool:
        """Whether `now` (local wall-clock time) falls in a quiet range."""
        for item in self.quiet_hours:
            start_s, end_s = item.split("-")
            start, end = time.fromisoformat(start_s), time.fromisoformat(end_s)
            if (start <= now < end) if start <= end else (now >= start or now < end):
                return True
        return False


class Resources(_Section):
    """Where learning may run, and when the device counts as spare."""

    device: str = Field("auto", description="auto (a spare GPU, else CPU), cpu, cuda or cuda:N.")
    min_free_gpu_mib: int = Field(4096, ge=0, description="A GPU is spare with at least this much free memory.")
    max_gpu_utilization: float = Field(
        50.0, ge=0.0, le=100.0, description="... and at most this utilization (%) when it can be read."
    )
    max_cpu_load: float | None = Field(
        None, gt=0, description="On CPU: skip a cycle while the 1-minute load average per core exceeds this."
    )
    cpu_threads: int | None = Field(None, ge=1, description="Threads for training on CPU (default: half the cores).")


Trust = Literal["learn", "review"]


class SignalTrust(_Section):
    """Who may teach the model (``signals:``). Every correction, taught answer and document is training data;
    this says whose are learned directly and whose wait for an operator (the review queue) or for agreement.

    A principal is the name of the API key a signal came with (``runtime keys``); signals sent without a key
    (embedded use, or a server without keys) have no principal and take ``unauthenticated``.
    """

    default: Trust = Field("learn", description="Trust of a principal not listed in `principals`.")
    unauthenticated: Trust = Field("learn", description="Trust of signals sent without an API key.")
    principals: dict[str, Trust] = Field(
        default_factory=dict, description="Trust by principal: `learn` (learned directly) or `review` (waits)."
    )
    min_agreeing_principals: int = Field(
        1, ge=1, le=1000,
        description="With 2 or more: a signal awaiting review is released (learned next) once this many distinct "
        "principals sent the same correction (the same question, the same answer). 1: only an operator releases it.",
    )
    rate_limit_per_hour: int | None = Field(
        None, ge=1, description="Signals and documents one principal may send per hour (the server answers 429)."
    )
    max_per_principal_per_update: int | None = Field(
        None, ge=1, description="Most signals of one principal in one learning update (the rest wait for the next)."
    )

    def trust_of(self, principal: str | None) -> Trust:
        """The trust of signals from `principal` (``None``: sent without an API key)."""
        if principal is None:
            return self.unauthenticated
        return self.principals.get(principal, self.default)


class Policy(_Section):
    """A learning policy (``policy.yaml``)."""

    version: Literal[1] = 1
    name: str = "default"
    description: str | None = None
    protected: list[ProtectedBehaviour] = Field(default_factory=list)
    retention: list[RetentionSuite] = Field(default_factory=list)
    targets: TargetChecks = Field(default_factory=TargetChecks)
    promotion: Promotion = Field(default_factory=Promotion)
    shadow: ShadowCriteria = Field(default_factory=ShadowCriteria)
    schedule: Schedule = Field(default_factory=Schedule)
    resources: Resources = Field(default_factory=Resources)
    signals: SignalTrust = Field(default_factory=SignalTrust)
    refusal_markers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS),
        description="Case-insensitive phrases that make an answer a refusal.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        for kind, items in (("protected", self.protected), ("retention", self.retention)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique; repeated: {', '.join(dupes)}")
        return self


def policy_schema() -> dict[str, Any]:
    """The JSON schema of a policy file."""
    return Policy.model_json_schema()
