"""The unit of training work that both learners consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DemoExample", "TrainingText"]

TrainingText = str | Sequence[int]
"""One plain-text training sequence (SEAL's self-edits, passages and replay): a string is untrusted text
(document text, a self-edit), tokenised with its special-token strings spelled by ordinary tokens; token ids
are taken as given (a chat-template render from :func:`runtime.chat_encoding.encode_chat`, whose control
tokens are real)."""


@dataclass
class DemoExample:
    """A query together with the answer the model should have given.

    Attributes:
        prompt: Chat messages (``{"role": ..., "content": ...}``) ending with the user turn. Earlier turns
            (a system message, prior exchanges) are kept as they are by both learners.
        demonstration: The desired assistant answer. SFT trains on it directly; SDFT puts it in the
            teacher's prompt and never trains on its tokens.
        source_id: The id of the signal (correction, taught answer, ...) this example came from.
    """

    prompt: list[dict[str, str]]
    demonstration: str
    source_id: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("DemoExample.prompt must hold at least one message")
        if self.prompt[-1].get("role") != "user":
            raise ValueError(f"DemoExample.prompt must end with a user turn, got role {self.prompt[-1].get('role')!r}")

    @classmethod
    def from_question(
        cls, question: str, demonstration: str, *, system: str | None = None, source_id: str | None = None
    ) -> DemoExample:
        """Build an example from a single user question (and an optional system message)."""
        prompt = [{"role": "system", "content": system}] if system is not None else []
        prompt.append({"role": "user", "content": question})
        return cls(prompt=prompt, demonstration=demonstration, source_id=source_id)
