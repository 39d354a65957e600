"""The engine interface: batched chat/generation, streaming, scoring and LoRA adapter management.

An engine serves one base model and any number of named LoRA adapters. Every request chooses what serves
it with ``adapter``: a loaded adapter's name, ``None`` for the base model, or :data:`ACTIVE` (the default)
for the engine's current default adapter (see :meth:`Engine.set_active_adapter`). The name of what
actually served a request is reported in :attr:`Generation.adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar

from runtime.chat_encoding import common_prefix_length
from runtime.engines.errors import EngineError

__all__ = [
    "ACTIVE",
    "AdapterChoice",
    "AdapterChoices",
    "Conversation",
    "Engine",
    "Generation",
    "SamplingParams",
    "StreamResult",
    "align_completion",
    "resolve_per_row",
    "selected_adapter",
]

_T = TypeVar("_T")

Conversation = Sequence[Mapping[str, str]]
"""A chat: messages as ``{"role": ..., "content": ...}`` dicts."""


@dataclass
class SamplingParams:
    """How to decode.

    Attributes:
        max_new_tokens: the most tokens to generate.
        temperature: 0 means greedy decoding; above 0, sampling at this temperature.
        top_p: nucleus sampling mass (sampling only).
        stop: stop strings; the output is cut before the first occurrence of any of them.
        seed: makes sampling reproducible (same prompts, same batch, same seed, same output).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stop is not None and any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Generation:
    """One generated completion.

    Attributes:
        text: the completion (special tokens removed, cut before any stop string).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated (including a final end-of-turn token).
        finish_reason: ``"stop"`` (end of turn or a stop string) or ``"length"`` (max_new_tokens reached).
        adapter: the adapter that served it; ``None`` for the base model.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    adapter: str | None


class _Active:
    """Type of :data:`ACTIVE`."""

    _instance: _Active | None = None

    def __new__(cls) -> _Active:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ACTIVE"

    def __reduce__(self) -> str:
        return "ACTIVE"


ACTIVE: Final = _Active()
"""Adapter choice meaning "the engine's current default adapter" (which may be the base model)."""

AdapterChoice = str | None | _Active
"""An adapter name, ``None`` for the base model, or :data:`ACTIVE`."""

AdapterChoices = AdapterChoice | Sequence[AdapterChoice]
"""One :data:`AdapterChoice` for a whole batch, or a list with one per row (rows may differ)."""


def selected_adapter(adapter: AdapterChoice, active: str | None) -> str | None:
    """The adapter name a choice selects: ``active`` for :data:`ACTIVE`, ``None`` (the base model) for
    ``None``, else the name itself (not checked to be loaded).

    Raises:
        TypeError: ``adapter`` is none of these.
    """
    if isinstance(adapter, _Active):
        return active
    if adapter is None:
        return None
    if not isinstance(adapter, str):
        raise TypeError(f"adapter must be a name, None or ACTIVE, not {type(adapter).__name__}")
    return adapter


def resolve_per_row(adapter: AdapterChoices, n: int, resolve: Callable[[AdapterChoice], _T]) -> list[_T]:
    """``resolve`` applied to the choice of each of ``n`` rows.

    A single choice is resolved once (so an unknown name fails even for an empty batch) and shared by all
    rows; a list must have one choice per row.
    """
    if adapter is None or isinstance(adapter, (str, _Active)):
        return [resolve(adapter)] * n
    choices = list(adapter)
    if len(choices) != n:
        raise ValueError(f"{len(choices)} adapter choices for {n} rows")
    return [resolve(c) for c in choices]


def align_completion(
    prompt_ids: Sequence[int], full_ids: Sequence[int], context: Callable[[], list[int]]
) -> tuple[list[int], int]:
    """The tokens to score and the index of the first completion token, as :meth:`Engine.score` defines it.

    Args:
        prompt_ids: the tokenised prompt.
        full_ids: the tokenised prompt + completion.
        context: tokens to put first when the two share no prefix (e.g. an empty prompt), because the first
            scored token needs something to be predicted from; usually the tokenizer's BOS. Called only then.

    The completion's tokens are those of ``full_ids`` after its longest prefix shared with ``prompt_ids``.
    """
    start = common_prefix_length(prompt_ids, full_ids)
    full = list(full_ids)
    if start == 0 and full:
        bos = context()
        full, start = [*bos, *full], len(bos)
    return full, start


class StreamResult(Iterator[str]):
    """A streamed generation: iterate it for text deltas; afterwards :attr:`generation` holds the result.

    The deltas concatenate to ``generation.text`` (stop strings are never emitted: text that could be the
    start of a stop string is held back until it is known not to be one). Generation starts on the first
    ``next()``. Breaking off early and calling :meth:`close` (or leaving a ``with`` block) cancels it::

        stream = engine.stream_chat([{"role": "user", "content": "Hi"}])
        for delta in stream:
            print(delta, end="")
        print(stream.generation.finish_reason)

    Engines build it from a generator that yields the deltas and returns the final :class:`Generation`.
    """

    def __init__(self, deltas: Generator[str, None, Generation]) -> None:
        self._deltas = deltas
        self._generation: Generation | None = None

    def __iter__(self) -> StreamResult:
        return self

    def __next__(self) -> str:
        if self._generation is not None:
            raise StopIteration
        try:
            return next(self._deltas)
        except StopIteration as stop:
            self._generation = stop.value
            raise StopIteration from None

    @property
    def done(self) -> bool:
        """Whether the stream is exhausted (and :attr:`generation` is available)."""
        return self._generation is not None

    @property
    def generation(self) -> Generation:
        """The final result; raises ``RuntimeError`` before the stream is exhausted."""
        if self._generation is None:
            raise RuntimeError("The stream is not finished: iterate it to the end first.")
        return self._generation

    def close(self) -> None:
        """Cancel the generation if it is still running."""
        self._deltas.close()

    def __enter__(self) -> StreamResult:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Engine(ABC):
    """A served base model with hot-swappable LoRA adapters.

    Implementations are thread-safe: a request runs entirely on the adapter it started with, and adapter
    changes never interleave with a forward pass.
    """

    model_name: str
    """Name of the served base model (an alias, a path or a server-side name)."""

    _closed: bool = False
    """Set by :meth:`close` in implementations; requests and adapter calls then raise :class:`EngineError`."""

    follower: bool = False
    """True when another process (the fleet's learner) chooses the adapters this engine serves
    (``engine.follow_replicas``): the runtime then neither loads adapters into it nor learns with it."""

    # -- requests -------------------------------------------------------------------------------------
    @abstractmethod
    def chat(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Answer a batch of conversations (rendered with the model's chat template), one result each.

        ``adapter`` is one choice for the batch or a list with one per conversation.
        """

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Continue a batch of raw text prompts, one result each (``adapter``: one, or one per prompt)."""

    @abstractmethod
    def stream_chat(
        self,
        conversation: Conversation,
        params: SamplingParams | None = None,
        adapter: AdapterChoice = ACTIVE,
    ) -> StreamResult:
        """Answer one conversation as a stream of text deltas (see :class:`StreamResult`)."""

    @abstractmethod
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        adapter: AdapterChoices = ACTIVE,
    ) -> list[list[float]]:
        """Log-probabilities of each completion's tokens given its prompt, one float per token.

        The completion's tokens are those of ``prompt + completion`` after the longest prefix shared with
        the tokenised prompt, so a token spanning the boundary counts as a completion token. ``adapter`` is
        one choice for all rows or a list with one per row.
        """

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text`` under the model's tokenizer."""

    # -- adapters -------------------------------------------------------------------------------------
    @abstractmethod
    def load_adapter(
        self, name: str, path: str | Path, *, activate: bool = False, replace: bool = False
    ) -> None:
        """Load a PEFT LoRA adapter directory under ``name``.

        Args:
            name: the name requests use to choose it.
            path: directory with ``adapter_config.json`` and the adapter weights.
            activate: also make it the default adapter for requests.
            replace: reload an already-loaded ``name`` atomically (requests see the old or the new weights,
                never a mix); without it, loading an existing name raises ``AdapterExistsError``.

        Raises:
            AdapterLoadError: the adapter could not be loaded; nothing changed.
        """

    @abstractmethod
    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; if it was the active one, the base model becomes active."""

    @abstractmethod
    def set_active_adapter(self, name: str | None) -> None:
        """Set the default adapter for requests that pass :data:`ACTIVE` (``None`` = the base model)."""

    @property
    @abstractmethod
    def active_adapter(self) -> str | None:
        """The default adapter for requests (``None`` = the base model)."""

    @abstractmethod
    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""

    def has_adapter(self, name: str) -> bool:
        """Whether an adapter of that name is loaded."""
        return name in self.list_adapters()

    def queue_depth(self) -> int | None:
        """Calls (generations, adapter loads, evaluations) waiting for the engine; ``None`` when the engine
        cannot tell (a remote server queues requests itself)."""
        return None

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the model and its resources; the engine cannot be used afterwards."""

    def _check_open(self) -> None:
        """Raise :class:`EngineError` if the engine is closed."""
        if self._closed:
            raise EngineError("The engine is closed.")

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
