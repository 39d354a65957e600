"""Errors raised by engines."""

from __future__ import annotations

__all__ = [
    "AdapterExistsError",
    "AdapterLoadError",
    "ContextLengthError",
    "EngineError",
    "UnknownAdapterError",
]


class EngineError(RuntimeError):
    """Base class of engine errors."""


class AdapterLoadError(EngineError):
    """An adapter could not be loaded; the engine's adapters and active adapter are unchanged."""


class AdapterExistsError(EngineError, ValueError):
    """An adapter of that name is already loaded (pass ``replace=True`` to reload it)."""


class UnknownAdapterError(EngineError, KeyError):
    """A request or call named an adapter that is not loaded."""

    def __init__(self, name: str, loaded: list[str]) -> None:
        self.name = name
        self.loaded = list(loaded)
        listed = ", ".join(repr(n) for n in self.loaded) if self.loaded else "none"
        super().__init__(
            f"Unknown adapter {name!r}; loaded adapters: {listed} (None selects the base model)."
        )

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


class ContextLengthError(EngineError, ValueError):
    """A request does not fit the model's context window; nothing was generated."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context
        super().__init__(
            f"The request needs {prompt_tokens} prompt + {max_new_tokens} new tokens, more than the model's "
            f"context of {context} tokens: shorten the conversation or lower max_new_tokens."
        )


class EngineBusyError(EngineError):
    """The engine's queue of waiting requests is full (``engine.max_queued_requests``); retry later."""
