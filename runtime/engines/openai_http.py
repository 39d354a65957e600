"""Engines that drive a running OpenAI-compatible inference server (vLLM, SGLang) over HTTP.

:class:`OpenAIHTTPEngine` holds what both servers share: chat and completions (``/v1/chat/completions``,
``/v1/completions``, streaming as server-sent events), token counting (``/tokenize``), a local registry of
the adapters this engine loaded (``ACTIVE`` is resolved against it when a request starts), runtime LoRA
loading, and the translation of transport and HTTP failures into engine errors that say what to do.
:mod:`runtime.engines.vllm_engine` and :mod:`runtime.engines.sglang_engine` fill in what differs: the LoRA
routes, how a request names its adapter, how prompt log-probabilities are obtained, and how a loaded name
is reloaded with new weights.

The server's filesystem is the one that matters for adapter paths: ``load_adapter`` sends the path to the
server, which reads the adapter itself.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx

from runtime.engines.base import (
    ACTIVE,
    AdapterChoice,
    AdapterChoices,
    Conversation,
    Engine,
    Generation,
    SamplingParams,
    StreamResult,
    _Active,
)
from runtime.engines.decoding import cut_at_stop, safe_stream_length
from runtime.engines.errors import (
    AdapterExistsError,
    AdapterLoadError,
    ContextLengthError,
    EngineError,
    UnknownAdapterError,
)

__all__ = [
    "OpenAIHTTPEngine",
    "ServerConnectionError",
    "ServerContextLengthError",
    "ServerError",
    "ServerTimeoutError",
    "UnsupportedOperationError",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

# Adapters reloaded by swapping (see OpenAIHTTPEngine._swap) are served under "<name>@r<revision>".
_REVISION = re.compile(r"^(?P<name>.+)@r(?P<revision>\d+)$")
_CONTEXT_WORDS = re.compile(r"context length|context window|max_model_len|maximum model length", re.IGNORECASE)
_ALREADY_WORDS = re.compile(r"already (?:been )?loaded|already exists", re.IGNORECASE)
_MISSING_WORDS = re.compile(r"does not exist|not found|not loaded|cannot be found|unknown|no such", re.IGNORECASE)


# -- errors -----------------------------------------------------------------------------------------------
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


class _AlreadyLoaded(Exception):
    """The server already has an adapter under the name a load asked for."""


# -- the engine -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Served:
    """An adapter this engine knows: the path the server loaded it from and the name the server uses."""

    path: str
    server_name: str
    revision: int = 0


@dataclass(frozen=True)
class _Target:
    """What serves one request: the engine's adapter name and the server's (both ``None`` for the base)."""

    name: str | None
    server_name: str | None


class OpenAIHTTPEngine(Engine):
    """Base of the engines that drive an OpenAI-compatible server (use :class:`VLLMEngine` or
    :class:`SGLangEngine`).

    Args:
        base_url: the server's address, e.g. ``http://localhost:8000`` (a trailing ``/v1`` is accepted).
        model: the served base model's name; by default the first base model ``GET /v1/models`` lists.
        api_key: sent as ``Authorization: Bearer ...`` (for servers started with ``--api-key``).
        timeout: seconds to wait for the server to answer (and between two streamed chunks).
        connect_timeout: seconds to wait for a connection.
        max_concurrency: requests of one batch sent at the same time (the server batches them).
        transport: an ``httpx`` transport to use instead of the network (for tests and proxies).

    The constructor asks the server for its models, so a server that is down fails here with a message that
    says how to start it. Adapters the server already serves (e.g. from ``--lora-modules``) are adopted when
    ``/v1/models`` lists them with a ``parent``.

    Thread-safe: adapter changes are serialised; requests resolve their adapter when they start and run
    concurrently. ``close()`` closes the connections; adapters stay loaded on the server.
    """

    server_kind: ClassVar[str] = "OpenAI-compatible"
    """Server name used in messages."""
    start_hint: ClassVar[str] = ""
    """A command line that starts the server with runtime LoRA loading (shown when it cannot be reached)."""
    load_route: ClassVar[str] = ""
    unload_route: ClassVar[str] = ""
    lora_setup_hint: ClassVar[str] = ""
    """How to enable runtime LoRA loading on the server (shown when its LoRA routes are missing)."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        max_concurrency: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.base_url = _normalise_base_url(base_url)
        self.timeout = timeout
        self._max_concurrency = max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self._lock = threading.RLock()  # the registry, the active adapter, closed
        self._admin = threading.Lock()  # one adapter change at a time (held across its HTTP calls)
        self._adapters: dict[str, _Served] = {}
        self._active: str | None = None
        self._closed = False
        self.context_length: int | None = None
        """Tokens the model attends to (prompt and completion together), when the server says."""
        try:
            self.model_name = self._discover(model)
        except BaseException:
            self._client.close()
            raise

    # -- requests ---------------------------------------------------------------------------------------
    def chat(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Answer a batch of conversations (the server applies the chat template); one request each, sent
        concurrently. ``adapter`` may also be a list, one choice per conversation."""
        params = params or SamplingParams()
        messages = [_messages(c) for c in conversations]
        targets = self._targets(adapter, len(messages))

        def one(i: int) -> Generation:
            body = {"model": self._model_field(targets[i]), "messages": messages[i], **_sampling_body(params)}
            data = self._request_json("/v1/chat/completions", body, targets[i], params)
            choice = _first_choice(data, "/v1/chat/completions")
            text = (choice.get("message") or {}).get("content") or ""
            return _generation(text, choice.get("finish_reason"), data.get("usage"), params, targets[i].name)

        return self._map(one, range(len(messages)))

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | None = None,
        adapter: AdapterChoices = ACTIVE,
    ) -> list[Generation]:
        """Continue a batch of raw prompts with ``/v1/completions`` (the server adds its special tokens,
        e.g. BOS); ``adapter`` may also be a list, one choice per prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        params = params or SamplingParams()
        prompts = list(prompts)
        targets = self._targets(adapter, len(prompts))

        def one(i: int) -> Generation:
            body = {"model": self._model_field(targets[i]), "prompt": prompts[i], **_sampling_body(params)}
            data = self._request_json("/v1/completions", body, targets[i], params)
            choice = _first_choice(data, "/v1/completions")
            return _generation(
                choice.get("text") or "", choice.get("finish_reason"), data.get("usage"), params, targets[i].name
            )

        return self._map(one, range(len(prompts)))

    def stream_chat(
        self,
        conversation: Conversation,
        params: SamplingParams | None = None,
        adapter: AdapterChoice = ACTIVE,
    ) -> StreamResult:
        """Answer one conversation as text deltas (server-sent events); see :class:`StreamResult`.

        An unknown adapter name raises here; with :data:`ACTIVE` the adapter is fixed when the request is
        sent (on the first ``next()``). Closing the stream early closes the connection, which cancels the
        generation on the server.
        """
        params = params or SamplingParams()
        messages = _messages(conversation)
        with self._lock:
            self._check_open()
            if adapter is not ACTIVE:
                self._resolve(adapter)
        return StreamResult(self._stream(messages, params, adapter))

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        adapter: AdapterChoices = ACTIVE,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion given its prompt, from the server's prompt log-probs.

        Tokens are aligned as :meth:`Engine.score` says, with the server's ``/tokenize``; ``adapter`` may be
        one choice per row.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = list(zip(prompts, completions, strict=True))
        targets = self._targets(adapter, len(rows))

        def one(i: int) -> list[float]:
            full, start = self._align(*rows[i])
            if start >= len(full):
                return []
            logprobs = self._prompt_logprobs(full, targets[i])
            if len(logprobs) < len(full) or any(lp is None for lp in logprobs[start : len(full)]):
                raise ServerError(
                    f"The {self.server_kind} server at {self.base_url} returned {len(logprobs)} prompt "
                    f"log-probs for {len(full)} tokens; cannot score. Use TransformersEngine.score instead."
                )
            return [float(lp) for lp in logprobs[start : len(full)]]  # type: ignore[arg-type]

        return self._map(one, range(len(rows)))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` under the served model's tokenizer (no special tokens), via ``/tokenize``."""
        return len(self._tokenize(text, add_special_tokens=False))

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(
        self, name: str, path: str | Path, *, activate: bool = False, replace: bool = False
    ) -> None:
        """Have the server load the PEFT LoRA adapter in ``path`` (a path on the server's machine) as
        ``name``; see :meth:`Engine.load_adapter`.

        With ``replace``, a loaded ``name`` gets the new weights: requests that start afterwards use them.

        Raises:
            AdapterExistsError: ``name`` is loaded and ``replace`` is false.
            AdapterLoadError: the server could not load it (or could not be reached); nothing changed.
        """
        _check_name(name)
        server_path = _server_path(path)
        with self._admin:
            with self._lock:
                self._check_open()
                current = self._adapters.get(name)
            if current is not None and not replace:
                raise AdapterExistsError(
                    f"An adapter named {name!r} is already loaded; unload it first or pass replace=True."
                )
            retired: str | None = None
            if current is None:
                try:
                    self._server_load(name, name, server_path)
                    served = _Served(server_path, name)
                except _AlreadyLoaded:  # loaded on the server before this engine started, or by someone else
                    served, retired = self._reload(name, server_path, _Served("", name))
            else:
                served, retired = self._reload(name, server_path, current)
            with self._lock:
                self._adapters[name] = served
                if activate:
                    self._active = name
            if retired is not None:
                self._retire(retired)

    def unload_adapter(self, name: str) -> None:
        """Unload ``name`` from the server; if it was active, the base model becomes active."""
        with self._admin:
            with self._lock:
                self._check_open()
                served = self._adapters.get(name)
                if served is None:
                    raise UnknownAdapterError(name, list(self._adapters))
            self._server_unload(name, served.server_name, missing_ok=True)
            with self._lock:
                del self._adapters[name]
                if self._active == name:
                    self._active = None

    def set_active_adapter(self, name: str | None) -> None:
        """Make ``name`` (or the base model, for ``None``) the default for requests."""
        with self._lock:
            self._check_open()
            if name is not None and name not in self._adapters:
                raise UnknownAdapterError(name, list(self._adapters))
            self._active = name

    @property
    def active_adapter(self) -> str | None:
        """The default adapter for requests (``None`` = the base model)."""
        return self._active

    def list_adapters(self) -> list[str]:
        """Loaded adapter names, in load order."""
        with self._lock:
            return list(self._adapters) if not self._closed else []

    def adapter_path(self, name: str) -> str:
        """The path the server loaded adapter ``name`` from (as sent to it)."""
        with self._lock:
            self._check_open()
            if name not in self._adapters:
                raise UnknownAdapterError(name, list(self._adapters))
            return self._adapters[name].path

    def close(self) -> None:
        """Close the connections; later calls raise :class:`EngineError`. The server keeps its adapters."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._active = None
            self._client.close()

    # -- what the servers differ in ---------------------------------------------------------------------
    @abstractmethod
    def _model_field(self, target: _Target) -> str:
        """The ``model`` field of a request served by ``target``."""

    @abstractmethod
    def _prompt_logprobs(self, token_ids: list[int], target: _Target) -> list[float | None]:
        """Log-prob of each of ``token_ids`` given the ones before it (``None`` for the first)."""

    def _reload(self, name: str, path: str, current: _Served) -> tuple[_Served, str | None]:
        """Give the loaded ``name`` the weights in ``path``; returns the new entry and the server name to
        unload once requests no longer pick it (``None`` when nothing needs unloading)."""
        return self._swap(name, path, current)

    def _swap(self, name: str, path: str, current: _Served) -> tuple[_Served, str | None]:
        """Reload by loading the new weights under a fresh server name; the engine switches to it only
        after it loaded (so requests see the old or the new weights, and a failed load changes nothing)."""
        for revision in range(current.revision + 1, current.revision + 21):
            server_name = f"{name}@r{revision}"
            try:
                self._server_load(name, server_name, path)
            except _AlreadyLoaded:  # left on the server by an earlier process; it stays there
                log.warning("The %s server already has %r; trying the next revision", self.server_kind, server_name)
                continue
            return _Served(path, server_name, revision), current.server_name
        raise AdapterLoadError(
            f"Could not reload adapter {name!r}: the server already has revisions {current.revision + 1} to "
            f"{current.revision + 20} of it loaded. Unload them on the server (POST {self.unload_route}) or restart it."
        )

    # -- internals: requests ----------------------------------------------------------------------------
    def _targets(self, adapter: AdapterChoices, n: int) -> list[_Target]:
        with self._lock:
            self._check_open()
            if adapter is None or isinstance(adapter, (str, _Active)):
                return [self._resolve(adapter)] * n
            choices = list(adapter)
            if len(choices) != n:
                raise ValueError(f"{len(choices)} adapter choices for {n} rows")
            return [self._resolve(c) for c in choices]

    def _resolve(self, adapter: AdapterChoice) -> _Target:
        """The target of one choice (caller holds the lock)."""
        name = self._active if isinstance(adapter, _Active) else adapter
        if name is None:
            return _Target(None, None)
        if not isinstance(name, str):
            raise TypeError(f"adapter must be a name, None or ACTIVE, not {type(name).__name__}")
        served = self._adapters.get(name)
        if served is None:
            raise UnknownAdapterError(name, list(self._adapters))
        return _Target(name, served.server_name)

    def _map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(len(items), self._max_concurrency), thread_name_prefix="http-engine") as pool:
            return list(pool.map(fn, items))

    def _request_json(self, path: str, body: Mapping[str, Any], target: _Target, params: SamplingParams) -> Any:
        response = self._send("POST", path, body)
        if response.is_error:
            raise self._request_error(response, "POST", path, target, params.max_new_tokens)
        return _json(response, self, path)

    def _stream(
        self, messages: list[dict[str, str]], params: SamplingParams, adapter: AdapterChoice
    ) -> Generator[str, None, Generation]:
        path = "/v1/chat/completions"
        with self._lock:
            self._check_open()
            target = self._resolve(adapter)
        body = {
            "model": self._model_field(target),
            "messages": messages,
            **_sampling_body(params),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, emitted, chunks = "", 0, 0
        finish: str | None = None
        usage: Mapping[str, Any] | None = None
        with self._transport_errors("POST", path), self._client.stream("POST", path, json=body) as response:
            if response.is_error:
                response.read()
                raise self._request_error(response, "POST", path, target, params.max_new_tokens)
            for event in _sse_events(response.iter_lines(), self, path):
                if "error" in event or event.get("object") == "error":
                    message = _error_message(event)
                    raise ServerError(
                        f"The {self.server_kind} server at {self.base_url} failed while streaming: {message}",
                        server_message=message,
                    )
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text += delta
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                shown, cut = cut_at_stop(text, params.stop)
                end = len(shown) if cut else safe_stream_length(shown, params.stop)
                if end > emitted:
                    yield shown[emitted:end]
                    emitted = end
                if cut:
                    finish = "stop"
                    break  # leaving the block closes the connection: the server stops generating
        result = _generation(text, finish, usage, params, target.name, streamed_chunks=chunks)
        if len(result.text) > emitted:
            yield result.text[emitted:]
        return result

    def _align(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Tokens of prompt+completion and the index of the first completion token (see Engine.score)."""
        prompt_ids = self._tokenize(prompt, add_special_tokens=True)
        full = self._tokenize(prompt + completion, add_special_tokens=True)
        start = 0
        for a, b in zip(prompt_ids, full, strict=False):
            if a != b:
                break
            start += 1
        if start == 0 and full:  # the first token needs some context: the tokenizer's BOS, if it has one
            bos = self._tokenize("", add_special_tokens=True)
            if not bos:
                raise ValueError("Empty prompt, and the tokenizer adds no BOS token to start from")
            full, start = [*bos, *full], len(bos)
        return full, start

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        path = "/tokenize"
        body = {"model": self.model_name, "prompt": text, "add_special_tokens": add_special_tokens}
        response = self._send("POST", path, body)
        if _route_missing(response):
            raise UnsupportedOperationError(
                f"The {self.server_kind} server at {self.base_url} has no {path} endpoint, so count_tokens() and "
                f"score() cannot run on it: update the server, or use TransformersEngine with the same model."
            )
        if response.is_error:
            raise self._http_error(response, "POST", path)
        data = _json(response, self, path)
        if isinstance(data.get("max_model_len"), int) and data["max_model_len"] > 0 and self.context_length is None:
            self.context_length = data["max_model_len"]
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise ServerError(f"The {self.server_kind} server's {path} answer has no token list: {str(data)[:300]}")
        return [int(t) for t in tokens]

    # -- internals: adapters ----------------------------------------------------------------------------
    def _server_load(self, name: str, server_name: str, path: str, **extra: Any) -> None:
        """Ask the server to load ``path`` as ``server_name``; AdapterLoadError (nothing changed) if not."""
        route = self.load_route
        try:
            response = self._send("POST", route, {"lora_name": server_name, "lora_path": path, **extra})
        except EngineError as exc:
            raise AdapterLoadError(f"Could not load adapter {name!r} from {path}: {exc}") from exc
        if _route_missing(response):
            raise AdapterLoadError(self._lora_disabled(route, response.status_code))
        message = _response_message(response)
        if response.is_success and _reported_success(response):
            return
        if _ALREADY_WORDS.search(message):
            raise _AlreadyLoaded(message)
        raise AdapterLoadError(
            f"The {self.server_kind} server at {self.base_url} could not load adapter {name!r} from {path} "
            f"(HTTP {response.status_code}): {message}. The path must exist on the server's machine and the "
            f"adapter's rank must not exceed the server's --max-lora-rank; the engine's adapters are unchanged."
        )

    def _server_unload(self, name: str, server_name: str, *, missing_ok: bool) -> None:
        route = self.unload_route
        response = self._send("POST", route, {"lora_name": server_name})
        if _route_missing(response):
            raise EngineError(self._lora_disabled(route, response.status_code))
        if response.is_success and _reported_success(response):
            return
        message = _response_message(response)
        if missing_ok and _MISSING_WORDS.search(message):
            log.info("The %s server no longer had adapter %r (%s)", self.server_kind, server_name, message)
            return
        raise ServerError(
            f"The {self.server_kind} server at {self.base_url} could not unload adapter {name!r} "
            f"(HTTP {response.status_code}): {message}",
            status_code=response.status_code,
            server_message=message,
        )

    def _retire(self, server_name: str) -> None:
        """Unload a server name no request picks any more; a failure only leaves it loaded on the server."""
        try:
            self._server_unload(server_name, server_name, missing_ok=True)
        except EngineError as exc:
            log.warning("Could not unload the replaced adapter %r from the server: %s", server_name, exc)

    def _lora_disabled(self, route: str, status: int) -> str:
        return (
            f"The {self.server_kind} server at {self.base_url} does not offer runtime LoRA loading "
            f"(POST {route} answered HTTP {status}). {self.lora_setup_hint}"
        )

    def _discover(self, model: str | None) -> str:
        """The served base model's name; also adopts adapters the server lists and reads its context size."""
        path = "/v1/models"
        response = self._send("GET", path)
        if response.is_error:
            raise self._http_error(response, "GET", path)
        data = _json(response, self, path)
        listed = data.get("data") if isinstance(data, dict) else None
        cards = [c for c in listed or [] if isinstance(c, dict) and "id" in c]
        bases = [c for c in cards if not c.get("parent")]
        if not bases:
            raise EngineError(f"The {self.server_kind} server at {self.base_url} lists no models at {path}.")
        if model is None:
            card = bases[0]
        else:
            matches = [c for c in bases if c["id"] == model]
            if not matches:
                served = ", ".join(repr(c["id"]) for c in bases)
                raise EngineError(
                    f"The {self.server_kind} server at {self.base_url} does not serve {model!r}; it serves "
                    f"{served}. Pass one of these as model=, or leave model unset to use the first."
                )
            card = matches[0]
        if isinstance(card.get("max_model_len"), int):
            self.context_length = card["max_model_len"]
        for adapter in cards:
            if adapter.get("parent") == card["id"]:
                self._adopt(str(adapter["id"]), str(adapter.get("root") or ""))
        return str(card["id"])

    def _adopt(self, server_name: str, path: str) -> None:
        match = _REVISION.match(server_name)
        name, revision = (match["name"], int(match["revision"])) if match else (server_name, 0)
        current = self._adapters.get(name)
        if current is None or revision > current.revision:
            self._adapters[name] = _Served(path, server_name, revision)

    # -- internals: HTTP --------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: Mapping[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        with self._transport_errors(method, path):
            return self._client.request(method, path, json=body, **kwargs)

    @contextmanager
    def _transport_errors(self, method: str, path: str) -> Iterator[None]:
        """Translate httpx's transport failures into engine errors that say what to do."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServerTimeoutError(
                f"The {self.server_kind} server at {self.base_url} did not answer {method} {path} within "
                f"{self.timeout:g}s ({type(exc).__name__}): it may be overloaded or stuck (see its log), or the "
                f"request needs longer; raise the engine's timeout."
            ) from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ServerConnectionError(
                f"Cannot reach the {self.server_kind} server at {self.base_url} ({method} {path}: {exc}). "
                f"Is it running? Start it with: {self.start_hint}"
            ) from exc
        except httpx.HTTPError as exc:
            if self._closed:
                raise EngineError("The engine is closed.") from exc
            raise ServerConnectionError(
                f"HTTP failure talking to the {self.server_kind} server at {self.base_url} ({method} {path}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except RuntimeError as exc:  # httpx raises this for a request on a closed client
            if self._closed and not isinstance(exc, EngineError):
                raise EngineError("The engine is closed.") from exc
            raise

    def _request_error(
        self, response: httpx.Response, method: str, path: str, target: _Target, max_new_tokens: int
    ) -> EngineError:
        """The engine error for a failed generation or scoring request."""
        message = _response_message(response)
        status = response.status_code
        if status in (400, 413, 422) and _CONTEXT_WORDS.search(message):
            return ServerContextLengthError(
                message,
                prompt_tokens=_prompt_tokens_in(message),
                max_new_tokens=max_new_tokens,
                context=_context_in(message),
            )
        if (
            target.server_name is not None
            and status in (400, 404, 500)
            and target.server_name in message
            and _MISSING_WORDS.search(message)
        ):
            with self._lock:
                loaded = list(self._adapters)
            error = UnknownAdapterError(target.name or target.server_name, loaded)
            error.args = (
                f"The {self.server_kind} server at {self.base_url} does not have adapter {target.name!r} "
                f"(served as {target.server_name!r}) loaded: {message}. Was the server restarted? Load it "
                f"again with load_adapter(name, path, replace=True).",
            )
            return error
        return self._http_error(response, method, path)

    def _http_error(self, response: httpx.Response, method: str, path: str) -> ServerError:
        message = _response_message(response)
        status = response.status_code
        if _route_missing(response):
            hint = f" The server has no {path} endpoint: is {self.base_url} a {self.server_kind} server?"
        elif status in (401, 403):
            hint = " Check the API key (the server was started with --api-key)."
        elif status >= 500:
            hint = " This is a server-side failure: see the server's log."
        else:
            hint = ""
        return ServerError(
            f"The {self.server_kind} server at {self.base_url} answered {method} {path} with HTTP {status}: "
            f"{message}.{hint}",
            status_code=status,
            server_message=message,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("The engine is closed.")


# -- helpers ----------------------------------------------------------------------------------------------
def _normalise_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name or _REVISION.match(name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty name without ':', surrounding spaces or an "
            f"'@r<number>' suffix (reserved for reloads)."
        )


def _server_path(path: str | Path) -> str:
    """The path to send: absolute when it exists here (the server may share this filesystem), else as is."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def _messages(conversation: Conversation) -> list[dict[str, str]]:
    if isinstance(conversation, str):
        raise TypeError("a conversation is a list of {'role': ..., 'content': ...} messages, not a string")
    return [dict(m) for m in conversation]


def _sampling_body(params: SamplingParams) -> dict[str, Any]:
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


def _generation(
    text: str,
    finish_reason: str | None,
    usage: Mapping[str, Any] | None,
    params: SamplingParams,
    adapter: str | None,
    *,
    streamed_chunks: int | None = None,
) -> Generation:
    text, cut = cut_at_stop(text, params.stop)  # servers cut already; this keeps the engine contract if not
    usage = usage or {}
    completion_tokens = usage.get("completion_tokens")
    if not isinstance(completion_tokens, int):  # a server that reports no usage: one token per chunk
        completion_tokens = streamed_chunks or 0
    prompt_tokens = usage.get("prompt_tokens")
    return Generation(
        text=text,
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else 0,
        completion_tokens=completion_tokens,
        finish_reason="length" if finish_reason == "length" and not cut else "stop",
        adapter=adapter,
    )


def _first_choice(data: Any, path: str) -> Mapping[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ServerError(f"The server's answer to {path} has no choices: {str(data)[:300]}")
    return choices[0]


def _json(response: httpx.Response, engine: OpenAIHTTPEngine, path: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(
            f"The {engine.server_kind} server at {engine.base_url} answered {path} with something that is not "
            f"JSON: {response.text[:300]!r}"
        ) from exc


def _sse_events(lines: Iterator[str], engine: OpenAIHTTPEngine, path: str) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (``data: {...}`` lines, ending at ``data: [DONE]``)."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments (":"), "event:" lines
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        if not payload:
            continue
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ServerError(
                f"The {engine.server_kind} server at {engine.base_url} sent a malformed {path} stream chunk: "
                f"{payload[:300]!r}"
            ) from exc
        if isinstance(event, dict):
            yield event


def _route_missing(response: httpx.Response) -> bool:
    """Whether the server has no such route (FastAPI's own 404/405), as opposed to an error it returned."""
    if response.status_code == 405:
        return True
    if response.status_code != 404:
        return False
    try:
        return response.json() == {"detail": "Not Found"}
    except ValueError:
        return True


def _reported_success(response: httpx.Response) -> bool:
    """False for a 200 whose JSON body says ``"success": false`` (SGLang's adapter routes)."""
    try:
        data = response.json()
    except ValueError:
        return True
    return not (isinstance(data, dict) and data.get("success") is False)


def _response_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:1000] or response.reason_phrase
    return _error_message(data)


def _error_message(data: Any) -> str:
    """The message in an error body: vLLM's ``{"error": {"message"}}``, the flat OpenAI-style
    ``{"message"}`` (SGLang, older vLLM), SGLang's ``{"error_message"}`` or FastAPI's ``{"detail"}``."""
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


def _context_in(message: str) -> int | None:
    return _first_int(message, (
        r"maximum context length (?:is|of) (\d+)",
        r"context length \((\d+) tokens?\)",
        r"maximum model length (?:is |of )?(\d+)",
        r"max_model_len[^\d]{0,5}(\d+)",
    ))


def _prompt_tokens_in(message: str) -> int | None:
    return _first_int(message, (
        r"(\d+) (?:tokens )?in the messages",
        r"(\d+) tokens from the input",
        r"(\d+) input tokens",
        r"input \((\d+) tokens?\)",
        r"prompt \(length (\d+)\)",
    ))


def _first_int(message: str, patterns: Sequence[str]) -> int | None:
    """The number captured by the first of `patterns` that matches `message` (case-insensitive)."""
    for pattern in patterns:
        if match := re.search(pattern, message, re.IGNORECASE):
            return int(match.group(1))
    return None
