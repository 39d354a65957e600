"""Engines that drive a running OpenAI-compatible inference server (vLLM, SGLang) over HTTP.

:class:`OpenAIHTTPEngine` holds what both servers share: chat and completions (``/v1/chat/completions``,
``/v1/completions``, streaming as server-sent events), token counting (``/tokenize``), a local registry of
the adapters this engine loaded (``ACTIVE`` is resolved against it when a request starts), runtime LoRA
loading, and the translation of transport and HTTP failures into engine errors that say what to do.
:mod:`runtime.engines.vllm_engine` and :mod:`runtime.engines.sglang_engine` fill in what differs through the
hooks the class docstring lists: the LoRA routes, how a request names its adapter, how prompt
log-probabilities are obtained, and how a loaded name is reloaded with new weights.

Built on: :mod:`runtime.engines.openai_client` (the HTTP conversation with the server and its error
translation), :mod:`runtime.engines.openai_protocol` (request bodies, answer parsing),
:mod:`runtime.engines.served_adapters` (the adapter registry and server-side names) and
:mod:`runtime.engines.http_errors` (the error classes).

The server's filesystem is the one that matters for adapter paths: ``load_adapter`` sends the path to the
server, which reads the adapter itself.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx

import runtime.engines.openai_protocol as protocol
from runtime.engines.base import (
    ACTIVE,
    AdapterChoice,
    AdapterChoices,
    Conversation,
    Engine,
    Generation,
    SamplingParams,
    StreamResult,
    align_completion,
    resolve_per_row,
)
from runtime.engines.decoding import StreamDeltas
from runtime.engines.errors import AdapterExistsError, EngineError
from runtime.engines.http_errors import (
    ServerAdapterExistsError,
    ServerConnectionError,
    ServerContextLengthError,
    ServerError,
    ServerTimeoutError,
    UnsupportedOperationError,
)
from runtime.engines.openai_client import OpenAIServerClient
from runtime.engines.served_adapters import (
    AdapterTable,
    RequestTarget,
    ServedAdapter,
    check_adapter_name,
    load_next_revision,
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


def map_concurrently(fn: Callable[[_T], _R], items: Iterable[_T], max_workers: int, name: str) -> list[_R]:
    """``[fn(item) for item in items]``, the items in up to ``max_workers`` threads (one item: no thread)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(len(items), max_workers), thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


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

    Hooks for subclasses. A subclass for a server sets the class attributes ``server_kind``, ``start_hint``,
    ``load_route``, ``unload_route`` and ``lora_setup_hint`` and overrides:

    - ``_model_field(target)`` (abstract): the ``model`` field of a chat or completions request served by
      ``target`` (a :class:`~runtime.engines.served_adapters.RequestTarget`; both its names are ``None`` for
      the base model). Called once per request, chat, completions and streams alike.
    - ``_prompt_logprobs(token_ids, target)`` (abstract): the log-prob of each of ``token_ids`` given the
      ones before it (``None`` for the first), read from the server. Called by :meth:`score` once per row,
      with the aligned tokens; it may return more values than tokens (extra ones are ignored).
    - ``_reload(name, path, current)``: give the loaded ``name`` (``current``, a
      :class:`~runtime.engines.served_adapters.ServedAdapter`) the weights in ``path``; returns the new entry
      and the server name to unload once requests no longer pick it (``None`` when nothing needs
      unloading). Called by :meth:`load_adapter` for ``replace=True`` on a loaded name, and when the server
      already has the name (then ``current`` has an empty path); adapter changes are serialised around it.
      When the new weights cannot be loaded it raises :class:`AdapterLoadError`, and the engine keeps
      ``current``. The default calls ``_swap``; vLLM's reloads in place when the server allows it.

    Overridable too, for a server whose adapter routes differ from ``{"lora_name", "lora_path"}`` on
    ``load_route`` / ``{"lora_name"}`` on ``unload_route``: ``_server_load(name, server_name, path, **extra)``
    (raises :class:`~runtime.engines.http_errors.ServerAdapterExistsError` when the server already has
    ``server_name``, :class:`AdapterLoadError` for any other refusal) and ``_server_unload(name,
    server_name, missing_ok=...)``; and ``_discover(model)``, called once by the constructor, which returns
    the base model's name, sets ``context_length`` and adopts the adapters ``/v1/models`` lists.

    Helpers for subclasses to call: ``_send(method, path, body, **httpx_kwargs)`` (a request whose transport
    failures become engine errors), ``_json(response, path)``, ``_request_error(response, method, path,
    target, max_new_tokens)`` and ``_http_error(response, method, path)`` (the engine error to raise for an
    HTTP error answer), and ``_swap(name, path, current)`` (reload under a fresh server name).
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
        self.base_url = protocol.normalise_base_url(base_url)
        self.timeout = timeout
        self._max_concurrency = max_concurrency
        self._server = OpenAIServerClient(
            self.base_url,
            kind=self.server_kind,
            start_hint=self.start_hint,
            lora_setup_hint=self.lora_setup_hint,
            api_key=api_key,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_concurrency=max_concurrency,
            transport=transport,
        )
        self._lock = threading.RLock()  # the adapter table (with the active adapter), closed
        self._admin = threading.Lock()  # one adapter change at a time (held across its HTTP calls)
        self._table = AdapterTable()
        self._closed = False
        self.context_length: int | None = None
        """Tokens the model attends to (prompt and completion together), when the server says."""
        try:
            self.model_name = self._discover(model)
        except BaseException:
            self._server.close()
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
        messages = [protocol.chat_messages(c) for c in conversations]
        targets = self._targets(adapter, len(messages))

        def one(i: int) -> Generation:
            body = {"model": self._model_field(targets[i]), "messages": messages[i], **protocol.sampling_body(params)}
            data = self._request_json("/v1/chat/completions", body, targets[i], params)
            choice = protocol.first_choice(data, "/v1/chat/completions")
            text = (choice.get("message") or {}).get("content") or ""
            served = self._served_adapter(data, targets[i])
            return protocol.to_generation(text, choice.get("finish_reason"), data.get("usage"), params, served)

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
            body = {"model": self._model_field(targets[i]), "prompt": prompts[i], **protocol.sampling_body(params)}
            data = self._request_json("/v1/completions", body, targets[i], params)
            choice = protocol.first_choice(data, "/v1/completions")
            return protocol.to_generation(
                choice.get("text") or "", choice.get("finish_reason"), data.get("usage"), params,
                self._served_adapter(data, targets[i]),
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
        messages = protocol.chat_messages(conversation)
        with self._lock:
            self._check_open()
            if adapter is not ACTIVE:
                self._table.target(adapter)
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
        with self._admin:
            current = self._current_for_load(name, replace)
            sent_path = protocol.server_path(path)
            retired: str | None = None
            if current is None:
                try:
                    self._server_load(name, name, sent_path)
                    served = ServedAdapter(sent_path, name)
                except ServerAdapterExistsError:  # loaded before this engine started, or by someone else
                    served, retired = self._reload(name, sent_path, ServedAdapter("", name))
            else:
                served, retired = self._reload(name, sent_path, current)
            with self._lock:
                self._table.put(name, served, activate=activate)
            if retired is not None:
                self._retire(retired)

    def _current_for_load(self, name: str, replace: bool) -> ServedAdapter | None:
        """What ``name`` serves now (``None``: not loaded), checked for a load (call under ``_admin``): a valid
        name, an open engine, and :class:`AdapterExistsError` for a loaded ``name`` without ``replace``."""
        check_adapter_name(name)
        with self._lock:
            self._check_open()
            current = self._table.get(name)
        if current is not None and not replace:
            raise AdapterExistsError(
                f"An adapter named {name!r} is already loaded; unload it first or pass replace=True."
            )
        return current

    def unload_adapter(self, name: str) -> None:
        """Unload ``name`` from the server; if it was active, the base model becomes active."""
        with self._admin:
            with self._lock:
                self._check_open()
                served = self._table.require(name)
            self._server_unload(name, served.server_name, missing_ok=True)
            with self._lock:
                self._table.remove(name)

    def set_active_adapter(self, name: str | None) -> None:
        """Make ``name`` (or the base model, for ``None``) the default for requests."""
        with self._lock:
            self._check_open()
            self._table.set_active(name)

    @property
    def active_adapter(self) -> str | None:
        """The default adapter for requests (``None`` = the base model)."""
        return self._table.active

    def list_adapters(self) -> list[str]:
        """Loaded adapter names, in load order."""
        with self._lock:
            return self._table.names() if not self._closed else []

    def adapter_path(self, name: str) -> str:
        """The path the server loaded adapter ``name`` from (as sent to it)."""
        with self._lock:
            self._check_open()
            return self._table.require(name).path

    def close(self) -> None:
        """Close the connections; later calls raise :class:`EngineError`. The server keeps its adapters."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._table.active = None
            self._server.close()

    # -- hooks: what the servers differ in (see the class docstring) -------------------------------------
    @abstractmethod
    def _model_field(self, target: RequestTarget) -> str:
        """The ``model`` field of a request served by ``target``."""

    @abstractmethod
    def _prompt_logprobs(self, token_ids: list[int], target: RequestTarget) -> list[float | None]:
        """Log-prob of each of ``token_ids`` given the ones before it (``None`` for the first)."""

    def _target(self, adapter: AdapterChoice) -> RequestTarget:
        """What serves a request for ``adapter`` (called under the lock)."""
        return self._table.target(adapter)

    def _served_adapter(self, answer: Mapping[str, Any], target: RequestTarget) -> str | None:
        """The engine's name of the adapter that served ``answer`` (a response, or a streamed chunk that may say
        it); by default the one the request named."""
        return target.name

    def _reload(self, name: str, path: str, current: ServedAdapter) -> tuple[ServedAdapter, str | None]:
        """Give the loaded ``name`` the weights in ``path``; returns the new entry and the server name to
        unload once requests no longer pick it (``None`` when nothing needs unloading)."""
        return self._swap(name, path, current)

    def _swap(self, name: str, path: str, current: ServedAdapter) -> tuple[ServedAdapter, str | None]:
        """Reload by loading the new weights under a fresh server name; the engine switches to it only
        after it loaded (so requests see the old or the new weights, and a failed load changes nothing)."""
        served = load_next_revision(
            name, path, current, lambda server_name: self._server_load(name, server_name, path),
            server_kind=self.server_kind, unload_route=self.unload_route,
        )
        return served, current.server_name

    # -- internals: requests ----------------------------------------------------------------------------
    def _targets(self, adapter: AdapterChoices, n: int) -> list[RequestTarget]:
        with self._lock:
            self._check_open()
            return resolve_per_row(adapter, n, self._target)

    def _map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        return map_concurrently(fn, items, self._max_concurrency, "http-engine")

    def _request_json(
        self, path: str, body: Mapping[str, Any], target: RequestTarget, params: SamplingParams
    ) -> Any:
        response = self._send("POST", path, body)
        if response.is_error:
            raise self._request_error(response, "POST", path, target, params.max_new_tokens)
        return self._json(response, path)

    def _stream(
        self, messages: list[dict[str, str]], params: SamplingParams, adapter: AdapterChoice
    ) -> Generator[str, None, Generation]:
        path = "/v1/chat/completions"
        with self._lock:
            self._check_open()
            target = self._target(adapter)
        body = {
            "model": self._model_field(target),
            "messages": messages,
            **protocol.sampling_body(params),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, chunks = "", 0
        deltas = StreamDeltas(params.stop)
        finish: str | None = None
        usage: Mapping[str, Any] | None = None
        served = target.name
        with self._server.stream(path, body) as response:
            if response.is_error:
                response.read()
                raise self._request_error(response, "POST", path, target, params.max_new_tokens)
            for event in self._server.events(response, path):
                if (message := protocol.stream_error(event)) is not None:
                    raise ServerError(
                        f"The {self.server_kind} server at {self.base_url} failed while streaming: {message}",
                        server_message=message,
                    )
                usage = event.get("usage") or usage
                if "adapter" in event:
                    served = self._served_adapter(event, target)
                for choice in event.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text += delta
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                shown, cut = deltas.update(text)
                if shown:
                    yield shown
                if cut:
                    finish = "stop"
                    break  # leaving the block closes the connection: the server stops generating
        result = protocol.to_generation(text, finish, usage, params, served, streamed_chunks=chunks)
        if rest := deltas.rest(result.text):
            yield rest
        return result

    def _align(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Tokens of prompt+completion and the index of the first completion token (see Engine.score)."""
        prompt_ids = self._tokenize(prompt, add_special_tokens=True)
        full = self._tokenize(prompt + completion, add_special_tokens=True)
        return align_completion(prompt_ids, full, self._bos)

    def _bos(self) -> list[int]:
        """What the tokenizer puts before any text: context for a completion that has no prompt."""
        bos = self._tokenize("", add_special_tokens=True)
        if not bos:
            raise ValueError("Empty prompt, and the tokenizer adds no BOS token to start from")
        return bos

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        tokens, context = self._server.tokenize(self.model_name, text, add_special_tokens=add_special_tokens)
        if context is not None and self.context_length is None:
            self.context_length = context
        return tokens

    # -- internals: adapters ----------------------------------------------------------------------------
    def _server_load(self, name: str, server_name: str, path: str, **extra: Any) -> None:
        """Ask the server to load ``path`` as ``server_name``; AdapterLoadError (nothing changed) if not."""
        self._server.load_lora(self.load_route, name, server_name, path, **extra)

    def _server_unload(self, name: str, server_name: str, *, missing_ok: bool) -> None:
        """Ask the server to unload ``server_name`` (``missing_ok``: it may not have it any more)."""
        self._server.unload_lora(self.unload_route, name, server_name, missing_ok=missing_ok)

    def _retire(self, server_name: str) -> None:
        """Unload a server name no request picks any more; a failure only leaves it loaded on the server."""
        try:
            self._server_unload(server_name, server_name, missing_ok=True)
        except EngineError as exc:
            log.warning("Could not unload the replaced adapter %r from the server: %s", server_name, exc)

    def _discover(self, model: str | None) -> str:
        """The served base model's name; also adopts adapters the server lists and reads its context size."""
        card, adapters = self._server.base_model(model)
        if isinstance(card.get("max_model_len"), int):
            self.context_length = card["max_model_len"]
        for adapter in adapters:
            self._table.adopt(str(adapter["id"]), str(adapter.get("root") or ""))
        return str(card["id"])

    # -- internals: HTTP (helpers for subclasses) ------------------------------------------------------
    def _send(self, method: str, path: str, body: Mapping[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request; transport failures raise engine errors, HTTP errors are returned."""
        return self._server.send(method, path, body, **kwargs)

    def _json(self, response: httpx.Response, path: str) -> Any:
        """The JSON body of the answer to ``path``; :class:`ServerError` when it is not JSON."""
        return self._server.json(response, path)

    def _http_error(self, response: httpx.Response, method: str, path: str) -> ServerError:
        """The engine error for an HTTP error answer, with a hint for the usual causes."""
        return self._server.http_error(response, method, path)

    def _request_error(
        self, response: httpx.Response, method: str, path: str, target: RequestTarget, max_new_tokens: int
    ) -> EngineError:
        """The engine error for a failed generation or scoring request served by ``target``."""

        def loaded() -> list[str]:
            with self._lock:
                return self._table.names()

        return self._server.request_error(response, method, path, target, max_new_tokens, loaded=loaded)
