"""The OpenAI-compatible HTTP protocol as vLLM and SGLang speak it: building request bodies and reading
answers, server-sent event streams and error bodies. Pure functions: no connection and no engine state.

Error messages are matched by the phrases the servers use (context length, an adapter already loaded or
missing); the numbers a context-length message states are read from the wordings of vLLM, SGLang and
OpenAI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from runtime.engines.base import Conversation, Generation, SamplingParams
from runtime.engines.decoding import cut_at_stop
from runtime.engines.http_errors import ServerError

__all__ = [
    "ALREADY_WORDS",
    "CONTEXT_WORDS",
    "MISSING_WORDS",
    "chat_messages",
    "context_in",
    "error_message",
    "first_choice",
    "first_int",
    "is_context_length_error",
    "is_missing_adapter_error",
    "normalise_base_url",
    "prompt_tokens_in",
    "reported_success",
    "response_code",
    "response_json",
    "response_message",
    "route_missing",
    "sampling_body",
    "server_path",
    "sse_events",
    "stream_error",
    "to_generation",
]

CONTEXT_WORDS = re.compile(r"context length|context window|max_model_len|maximum model length", re.IGNORECASE)
"""Phrases of an error about a request that does not fit the model's context."""
ALREADY_WORDS = re.compile(r"already (?:been )?loaded|already exists", re.IGNORECASE)
"""Phrases of an error about loading an adapter under a name the server already has."""
MISSING_WORDS = re.compile(r"does not exist|not found|not loaded|cannot be found|unknown|no such", re.IGNORECASE)
"""Phrases of an error about an adapter (or model) the server does not have."""

_CONTEXT_PATTERNS = (
    r"maximum context length (?:is|of) (\d+)",
    r"context length \((\d+) tokens?\)",
    r"maximum model length (?:is |of )?(\d+)",
    r"max_model_len[^\d]{0,5}(\d+)",
)
_PROMPT_TOKEN_PATTERNS = (
    r"(\d+) (?:tokens )?in the messages",
    r"(\d+) tokens from the input",
    r"(\d+) input tokens",
    r"input \((\d+) tokens?\)",
    r"prompt \(length (\d+)\)",
)


# -- requests ---------------------------------------------------------------------------------------------
def normalise_base_url(base_url: str) -> str:
    """``base_url`` without surrounding spaces, a trailing ``/`` or a trailing ``/v1`` (routes add it).

    Raises:
        ValueError: it is not an ``http://`` or ``https://`` URL.
    """
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def server_path(path: str | Path) -> str:
    """The adapter path to send: absolute when it exists here (the server may share this filesystem), else as
    given (a path on the server's machine)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The ``messages`` of a chat request: a copy of each message.

    Raises:
        TypeError: ``conversation`` is a string rather than a list of messages.
    """
    if isinstance(conversation, str):
        raise TypeError("a conversation is a list of {'role': ..., 'content': ...} messages, not a string")
    return [dict(m) for m in conversation]


def sampling_body(params: SamplingParams) -> dict[str, Any]:
    """The sampling fields of a chat or completions request (``stop`` and ``seed`` only when set)."""
    body: dict[str, Any] = {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


# -- answers ----------------------------------------------------------------------------------------------
def to_generation(
    text: str,
    finish_reason: str | None,
    usage: Mapping[str, Any] | None,
    params: SamplingParams,
    adapter: str | None,
    *,
    streamed_chunks: int | None = None,
) -> Generation:
    """The :class:`Generation` of a server's answer.

    The text is cut at the first stop string (servers cut already; this keeps the engine's contract when one
    does not), and ``finish_reason`` is ``"length"`` only when the server says so and nothing was cut. Token
    counts come from ``usage``; without a completion count, each streamed chunk counts as one token.
    """
    text, cut = cut_at_stop(text, params.stop)
    usage = usage or {}
    completion_tokens = usage.get("completion_tokens")
    if not isinstance(completion_tokens, int):
        completion_tokens = streamed_chunks or 0
    prompt_tokens = usage.get("prompt_tokens")
    return Generation(
        text=text,
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
        completion_tokens=completion_tokens,
        finish_reason="length" if finish_reason == "length" and not cut else "stop",
        adapter=adapter,
    )


def first_choice(data: Any, path: str) -> Mapping[str, Any]:
    """The first of ``choices`` in an answer to ``path``.

    Raises:
        ServerError: the answer has no choices.
    """
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ServerError(f"The server's answer to {path} has no choices: {str(data)[:300]}")
    return choices[0]


def response_json(response: httpx.Response, path: str, *, server_kind: str, base_url: str) -> Any:
    """The JSON body of the server's answer to ``path``.

    Raises:
        ServerError: the body is not JSON (it quotes the start of it).
    """
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(
            f"The {server_kind} server at {base_url} answered {path} with something that is not JSON: "
            f"{response.text[:300]!r}"
        ) from exc


def sse_events(lines: Iterator[str], path: str, *, server_kind: str, base_url: str) -> Iterator[dict[str, Any]]:
    """The JSON object payloads of a server-sent event stream: ``data: {...}`` lines, up to ``data: [DONE]``.

    Blank separators, comments (``:``), other fields (``event:``) and empty or non-object payloads are
    skipped.

    Raises:
        ServerError: a ``data:`` payload is not JSON.
    """
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        if not payload:
            continue
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ServerError(
                f"The {server_kind} server at {base_url} sent a malformed {path} stream chunk: {payload[:300]!r}"
            ) from exc
        if isinstance(event, dict):
            yield event


def stream_error(event: Mapping[str, Any]) -> str | None:
    """The message of a stream event that reports a failure (vLLM's ``{"error": {...}}`` or an
    ``{"object": "error", ...}`` event), ``None`` for any other event."""
    if "error" in event or event.get("object") == "error":
        return error_message(event)
    return None


# -- errors -----------------------------------------------------------------------------------------------
def route_missing(response: httpx.Response) -> bool:
    """Whether the server has no such route (FastAPI's own 404 ``{"detail": "Not Found"}``, a 404 that is not
    JSON, or a 405), as opposed to an error the route returned."""
    if response.status_code == 405:
        return True
    if response.status_code != 404:
        return False
    try:
        return response.json() == {"detail": "Not Found"}
    except ValueError:
        return True


def reported_success(response: httpx.Response) -> bool:
    """False for an answer whose JSON body says ``"success": false`` (SGLang's adapter routes), else true."""
    try:
        data = response.json()
    except ValueError:
        return True
    return not (isinstance(data, dict) and data.get("success") is False)


def response_message(response: httpx.Response) -> str:
    """What the server said in an answer: the message of a JSON error body (see :func:`error_message`), else
    the text of the body (at most 1000 characters), else the HTTP reason phrase."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:1000] or response.reason_phrase
    return error_message(data)


def response_code(response: httpx.Response) -> str | None:
    """The ``code`` of an OpenAI-style JSON error body (``{"error": {"code"}}``), if it has one."""
    try:
        data = response.json()
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def error_message(data: Any) -> str:
    """The message in an error body: vLLM's ``{"error": {"message"}}`` (or ``{"error": "..."}``), the flat
    OpenAI-style ``{"message"}`` (SGLang, older vLLM), SGLang's ``{"error_message"}`` or FastAPI's
    ``{"detail"}``; a non-string value is given as JSON, anything else as its ``str`` (at most 1000
    characters)."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("message", "error_message", "detail"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return json.dumps(value)[:1000]
    return str(data)[:1000]


def is_context_length_error(status_code: int, message: str) -> bool:
    """Whether an HTTP error says the request does not fit the model's context."""
    return status_code in (400, 413, 422) and bool(CONTEXT_WORDS.search(message))


def is_missing_adapter_error(status_code: int, message: str, server_name: str | None) -> bool:
    """Whether an HTTP error says the server does not have the adapter it serves as ``server_name``
    (always false for the base model, ``None``).

    The message must name it as a whole word (so adapter ``a`` is not found in "adapters") and use one of the
    :data:`MISSING_WORDS`.
    """
    return (
        server_name is not None
        and status_code in (400, 404, 500)
        and re.search(rf"(?<!\w){re.escape(server_name)}(?!\w)", message) is not None
        and bool(MISSING_WORDS.search(message))
    )


def context_in(message: str) -> int | None:
    """The model's context size a context-length error message states, if it does."""
    return first_int(message, _CONTEXT_PATTERNS)


def prompt_tokens_in(message: str) -> int | None:
    """The prompt's token count a context-length error message states, if it does."""
    return first_int(message, _PROMPT_TOKEN_PATTERNS)


def first_int(message: str, patterns: Sequence[str]) -> int | None:
    """The number captured by the first of ``patterns`` that matches ``message`` (case-insensitive)."""
    for pattern in patterns:
        if match := re.search(pattern, message, re.IGNORECASE):
            return int(match.group(1))
    return None
