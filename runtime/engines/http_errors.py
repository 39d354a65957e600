"""Errors raised by the engines that drive an inference server over HTTP (vLLM, SGLang).

Each is an :class:`~runtime.engines.errors.EngineError`, so callers that handle engine errors in general
handle these too; the subclasses say what went wrong with the server and keep what it said.
"""

from __future__ import annotations

from runtime.engines.errors import ContextLengthError, EngineError

__all__ = [
    "ServerAdapterExistsError",
    "ServerConnectionError",
    "ServerContextLengthError",
    "ServerError",
    "ServerTimeoutError",
    "UnsupportedOperationError",
]


class ServerConnectionError(EngineError):
    """The server could not be reached (refused, unresolvable, dropped connection)."""


class ServerTimeoutError(EngineError):
    """The server did not answer within the engine's timeout."""


class ServerError(EngineError):
    """The server answered with an HTTP error; ``status_code`` and ``server_message`` keep what it said."""

    def __init__(self, message: str, *, status_code: int | None = None, server_message: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message


class UnsupportedOperationError(EngineError, NotImplementedError):
    """The server offers no endpoint for this operation; the message says what to use instead."""


class ServerContextLengthError(ContextLengthError):
    """The server refused a request that does not fit the model's context window.

    ``context`` and ``prompt_tokens`` are what the server's message states (``None`` when it does not say).
    """

    def __init__(
        self, server_message: str, *, prompt_tokens: int | None, max_new_tokens: int, context: int | None
    ) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context = prompt_tokens, max_new_tokens, context  # type: ignore[assignment]
        self.server_message = server_message
        EngineError.__init__(
            self,
            f"The request does not fit the model's context window (asked for {max_new_tokens} new tokens): "
            f"shorten the conversation or lower max_new_tokens. The server said: {server_message}",
        )


class ServerAdapterExistsError(Exception):
    """The server already has an adapter under the name a load asked for.

    Raised by :meth:`OpenAIHTTPEngine._server_load` and handled inside the engines (a load then takes the
    name over, a reload tries the next server name); it never reaches the engine's callers, so it is not an
    :class:`~runtime.engines.errors.EngineError`.
    """
