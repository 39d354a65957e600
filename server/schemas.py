"""Request and response models of the server's JSON API (OpenAI's shapes, plus the runtime's own routes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from learners.registry import LEARNING_METHODS

SEED_RANGE = (-(2**63), 2**63 - 1)
"""Seeds are 64-bit signed integers (what torch and vLLM take)."""


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that is not valid Unicode (a lone UTF-16 surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _lone_surrogate_at(key, path) or _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class RequestBody(BaseModel):
    """A request body: every string in it must be valid Unicode (JSON's ``"\\ud800"`` escapes decode to lone
    surrogates that no tokenizer or database takes)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate_at(data, "")
        if where:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (e.g. \\ud800): send valid Unicode text")
        return data

# --- OpenAI chat completions ---------------------------------------------------------------------------


class ContentPart(BaseModel):
    """One part of a message's content list; only ``text`` parts are understood by a text model."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One input message, as OpenAI's API takes it."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; non-text content parts are refused (this is a text-only model)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported: this model reads text only")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(RequestBody):
    """``POST /v1/chat/completions``.

    Unknown fields are ignored (as OpenAI-compatible servers do); fields that would change the answer in a
    way this server cannot honour (``tools``, ``logprobs``, penalties, structured ``response_format``) are
    refused with a clear error rather than silently dropped.
    """

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, description="Base model id, adapter name, or omitted/'default' (active).")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their no-op values:
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops or None

    def stop_list(self) -> list[str] | None:
        """``stop`` as a list (``None`` when absent)."""
        return self.stop if isinstance(self.stop, list) else None  # normalised by the validator


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None
    interaction_id: str | None = Field(None, description="The logged interaction this choice came from.")


class ChatCompletion(BaseModel):
    """The response of a non-streamed chat completion (OpenAI's ``chat.completion`` object)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    interaction_id: str | None = Field(None, description="The first choice's logged interaction id.")
    adapter: str | None = Field(None, description="The adapter that served it (null: the base model).")
    system_fingerprint: str | None = None


# --- models ------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``: the base model or an adapter."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "learning-runtime"
    root: str
    parent: str | None = None
    status: str = Field(description="`base`, or the adapter's registry status (`active`, `shadow`, ...).")
    loaded: bool = Field(description="Whether the engine has it in memory now.")
    lineage: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- feedback ------------------------------------------------------------------------------------------


class RatingRequest(RequestBody):
    """``POST /v1/interactions/{id}/rating``."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(description="E.g. 1 for good, -1 for bad.")
    comment: str | None = None


class CorrectionRequest(RequestBody):
    """``POST /v1/interactions/{id}/correction``: the answer the agent should have given."""

    model_config = ConfigDict(extra="forbid")

    text: str

    @field_validator("text")
    @classmethod
    def _says_something(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the corrected answer must be non-empty")
        return value


class TeachRequest(RequestBody):
    """``POST /v1/teach``: a prompt (or a conversation) and the answer to learn for it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    demonstration: str


class DocumentQuestion(BaseModel):
    """A question that probes a document, and its expected answer."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000)
    answer: str = Field(min_length=1, max_length=4000)


class DocumentRequest(RequestBody):
    """``POST /v1/documents``: new knowledge; ``questions`` (``{question, answer}``) probe it (bare question
    strings are accepted and kept, but without an answer they are not scored)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    title: str | None = None
    questions: list[str | DocumentQuestion] | None = None

    def question_rows(self) -> list[str | dict[str, Any]] | None:
        """``questions`` as the store keeps them (strings, or ``{question, answer}`` dicts)."""
        if self.questions is None:
            return None
        return [q if isinstance(q, str) else q.model_dump() for q in self.questions]


class SignalCreated(BaseModel):
    """What a feedback route returns."""

    id: str
    object: Literal["signal", "document"]
    kind: str
    interaction_id: str | None = None


# --- admin ---------------------------------------------------------------------------------------------


class LearnRequest(RequestBody):
    """``POST /admin/learn``: start one learning cycle in the background."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(
        None, description=f"{', '.join(LEARNING_METHODS)} (default: the policy's schedule, then the config's)."
    )


class PromoteRequest(RequestBody):
    """``POST /admin/adapters/{name}/promote``: optional; ``force`` to promote an adapter the gate vetoed."""

    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="Promote even an adapter the gate vetoed (recorded as forced).")
    reason: str | None = Field(None, max_length=2000, description="Why (recorded with the promotion).")

    @model_validator(mode="after")
    def _forcing_says_why(self) -> PromoteRequest:
        if self.force and not (self.reason or "").strip():
            raise ValueError("forcing a promotion past a veto needs a reason")
        return self


class SignalRetryRequest(RequestBody):
    """``POST /admin/signals/retry``: make held (or dismissed) signals pending again."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, max_length=10_000, description="Signal ids.")
    all_held: bool = Field(False, description="Every held signal (instead of ids).")


class SignalDismissRequest(RequestBody):
    """``POST /admin/signals/dismiss``: never learn these signals (unless retried); the reason is kept."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(..., min_length=1, max_length=10_000, description="Signal ids.")
    reason: str = Field(..., min_length=1, max_length=2000, description="Why they are not to be learned.")

    @field_validator("reason")
    @classmethod
    def _says_why(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the reason must say why the signals are dismissed")
        return value.strip()


class SignalReviewRequest(RequestBody):
    """``POST /admin/signals/review``: approve (learned next) or reject (dismissed) signals awaiting review."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(..., min_length=1, max_length=10_000, description="Signal ids awaiting review.")
    decision: Literal["approve", "reject"]
    reason: str | None = Field(None, max_length=2000, description="Why (stored; required to reject).")
    reviewer: str | None = Field(None, max_length=200, description="Who decided (default: the caller).")

    @model_validator(mode="after")
    def _rejection_says_why(self) -> SignalReviewRequest:
        if self.decision == "reject" and not (self.reason or "").strip():
            raise ValueError("a rejection needs a reason")
        return self
