"""Chat completions on the engine, through the agent's :class:`~agent.chat_model.EngineChatModel`.

Every call goes through the chat model, so it is logged to the store exactly like an agent call (and any
behaviour the chat model adds, such as shadow mirroring, applies). The blocking engine work runs in a
worker thread; streaming hands the deltas to the event loop through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from agent.chat_model import INTERACTION_ID_KEY, EngineChatModel
from runtime import shared_storage
from runtime.adapters import AdapterRegistry, AdapterVerificationError
from runtime.engines import (
    ACTIVE,
    AdapterChoice,
    AdapterLoadError,
    ContextLengthError,
    Engine,
    EngineBusyError,
    NoReplicaAvailableError,
    ServerConnectionError,
    UnknownAdapterError,
)
from server.errors import APIError
from server.limits import ServerLimits
from server.schemas import ChatCompletionRequest, ChatMessage

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAMES = frozenset({"", "default"})
"""``model`` values (besides omitting it) that mean "the active adapter"."""

BASE_MODEL_ALIAS = "base"
"""A ``model`` value that always means the base model without any adapter."""

_UNSERVABLE = frozenset({"rejected"})
"""Registry statuses an API client may not select by name (the gate vetoed them)."""

"""Registry adapters that are tools of a learner, never served (SEAL's self-edit generator)."""


@dataclass
class Completion:
    """One finished choice."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    interaction_id: str | None


@dataclass
class PreparedRequest:
    """A validated chat completion request, ready for the chat model."""

    messages: list[BaseMessage]
    adapter: AdapterChoice
    kwargs: dict[str, Any]
    """Sampling keyword arguments for the chat model (``max_new_tokens``, ``temperature``, ...)."""
    stop: list[str] | None
    config: dict[str, Any]
    """LangChain run config: ``metadata`` carries the thread id and the caller, which are logged."""
    n: int
    seed: int | None


class ModelResolver:
    """Maps a request's ``model`` to what serves it: the active adapter, the base model, or an adapter.

    An adapter recorded in the registry but not yet in the engine is loaded on first use (one at a time), its
    checksum verified first; adapters the gate rejected are not servable by name. A registered adapter whose files
    changed on disk or do not load answers 409 with the reason (and is counted in :attr:`refused`).
    """

    def __init__(self, engine: Engine, registry: AdapterRegistry) -> None:
        self.engine = engine
        self.registry = registry
        self.store = registry.store
        self._load_lock = threading.Lock()
        self.refused = 0
        """Adapters refused by name because their files failed verification or did not load."""

    @property
    def base_id(self) -> str:
        """The base model's id in ``/v1/models`` (the configured model name or path)."""
        return str(self.engine.model_name)

    def label(self, adapter: str | None) -> str:
        """The ``model`` a response reports for what served it."""
        return adapter if adapter is not None else self.base_id

    def resolve(self, model: str | None) -> AdapterChoice:
        """The engine's adapter choice for ``model``; raises a 404 ``model_not_found`` for unknown names.

        Blocking (it may read the store and load an adapter): call it in a worker thread.
        """
        if model is None or model.strip().lower() in DEFAULT_MODEL_NAMES:
            return ACTIVE
        if model in (self.base_id, BASE_MODEL_ALIAS) or model == Path(self.base_id).name:
            return None
        if self.engine.has_adapter(model):
            return model
        record = self.store.get_adapter(model)
        if record is None:
            raise APIError(404, f"The model {model!r} does not exist: use the base model {self.base_id!r}, "
                           "an adapter from GET /v1/models, or omit `model` for the active adapter.",
                           code="model_not_found", param="model")
        if record.role != "serving":
            raise APIError(404, f"{model!r} is a {record.method} {record.role} adapter used by the learner, not a "
                           "serving model.", code="model_not_found", param="model")
        if record.status in _UNSERVABLE:
            raise APIError(404, f"The adapter {model!r} was {record.status} by the policy gate and is not served; "
                           "see GET /admin/decisions for the reasons.", code="model_not_found", param="model")
        with self._load_lock:
            if not self.engine.has_adapter(model):
                if not shared_storage.is_url(record.path) and not Path(record.path).is_dir():
                    raise APIError(404, f"The adapter {model!r} is registered but its files are missing at "
                                   f"{record.path}.", code="model_not_found", param="model")
                try:
                    self.registry.load_into(self.engine, record)
                except (AdapterVerificationError, AdapterLoadError) as exc:
                    self.refused += 1
                    log.error("adapter %s refused by name: %s", model, exc)
                    raise APIError(409, f"The adapter {model!r} cannot be served: {exc}", code="adapter_refused",
                                   param="model") from None
        return model


def to_langchain(messages: list[ChatMessage], system_prompt: str | None) -> list[BaseMessage]:
    """OpenAI messages as LangChain messages; ``system_prompt`` is prepended when there is no system message."""
    out: list[BaseMessage] = []
    for i, msg in enumerate(messages):
        try:
            text = msg.text()
        except ValueError as exc:
            raise APIError(400, f"messages[{i}]: {exc}", code="invalid_content",
                           param=f"messages.{i}.content") from None
        if msg.tool_calls:
            raise APIError(400, f"messages[{i}]: assistant tool_calls are not supported by this server "
                           "(it serves plain chat); send the conversation as text.", param=f"messages.{i}.tool_calls")
        if msg.role in ("system", "developer"):
            out.append(SystemMessage(content=text))
        elif msg.role == "user":
            out.append(HumanMessage(content=text))
        elif msg.role == "assistant":
            out.append(AIMessage(content=text))
        else:
            out.append(ToolMessage(content=text, tool_call_id=msg.tool_call_id or f"call_{i}"))
    if system_prompt and not any(isinstance(m, SystemMessage) for m in out):
        out.insert(0, SystemMessage(content=system_prompt))
    return out


def check_supported(req: ChatCompletionRequest) -> None:
    """Refuse parameters this server cannot honour, instead of silently ignoring them."""
    unsupported = {
        "tools": bool(req.tools),
        "tool_choice": req.tool_choice not in (None, "none", "auto"),
        "logprobs": bool(req.logprobs),
        "top_logprobs": bool(req.top_logprobs),
        "frequency_penalty": bool(req.frequency_penalty),
        "presence_penalty": bool(req.presence_penalty),
        "logit_bias": bool(req.logit_bias),
        "response_format": req.response_format is not None and req.response_format.get("type") != "text",
    }
    for param, refused in unsupported.items():
        if refused:
            raise APIError(400, f"`{param}` is not supported by this server; remove it from the request.",
                           code="unsupported_parameter", param=param)


def prepare(req: ChatCompletionRequest, *, limits: ServerLimits, context_length: int | None,
            default_max_tokens: int, system_prompt: str | None, thread_id: str | None) -> PreparedRequest:
    """Validate ``req`` against the limits and turn it into chat-model arguments (no model choice yet)."""
    check_supported(req)
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages is over this server's limit of {limits.max_messages}; "
                       "shorten the conversation.", code="too_many_messages", param="messages")
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} is over this server's limit of {limits.max_n} choices.", param="n")
    if req.stream and req.n > 1:
        raise APIError(400, "Streaming with n > 1 is not supported; stream one choice or drop `stream`.", param="n")
    stop = req.stop_list()
    if stop and len(stop) > limits.max_stop:
        raise APIError(400, f"{len(stop)} stop strings is over the limit of {limits.max_stop}.", param="stop")
    if stop and max(len(s) for s in stop) > limits.max_stop_chars:
        raise APIError(400, f"A stop string of {max(len(s) for s in stop)} characters is over the limit of "
                       f"{limits.max_stop_chars}.", param="stop")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    cap = limits.max_tokens
    if context_length is not None:
        cap = context_length if cap is None else min(cap, context_length)
    if cap is not None and max_tokens > cap:
        where = "the model's context length" if cap == context_length else "this server's limit"
        raise APIError(400, f"{param}={max_tokens} is more than {where} of {cap} tokens; ask for fewer.",
                       code="max_tokens_too_large", param=param)
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens}
    if req.temperature is not None:
        kwargs["temperature"] = req.temperature
    if req.top_p is not None:
        kwargs["top_p"] = req.top_p
    metadata: dict[str, Any] = {"source": "openai-api"}
    if thread_id:
        metadata["thread_id"] = thread_id
    if req.user:
        metadata["user"] = req.user
    return PreparedRequest(
        messages=to_langchain(req.messages, system_prompt), adapter=ACTIVE, kwargs=kwargs, stop=stop,
        config={"metadata": metadata, "run_name": "chat.completions"}, n=req.n, seed=req.seed,
    )


def _completion(message: AIMessage | AIMessageChunk) -> Completion:
    meta = message.response_metadata or {}
    usage = message.usage_metadata or {}
    return Completion(
        text=message.text if isinstance(message.content, list) else str(message.content),
        finish_reason=str(meta.get("finish_reason") or "stop"),
        prompt_tokens=int(usage.get("input_tokens", 0)),
        completion_tokens=int(usage.get("output_tokens", 0)),
        adapter=meta.get("adapter"),
        interaction_id=meta.get(INTERACTION_ID_KEY),
    )


def translate_engine_error(exc: Exception) -> APIError | None:
    """The API error for an engine error a client caused (``None``: not the client's fault)."""
    if isinstance(exc, EngineBusyError):
        return APIError(429, f"The engine is busy: {exc}.", code="engine_busy", headers={"Retry-After": "1"})
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, ServerConnectionError | NoReplicaAvailableError):  # not the client's fault, but its retry helps
        return APIError(503, f"The serving engine could not answer: {exc}", code="engine_unavailable",
                        headers={"Retry-After": "1"})
    return None


def _raise_translated(exc: Exception) -> None:
    translated = translate_engine_error(exc)
    if translated is not None:
        raise translated from exc
    raise exc


MID_ANSWER_RETRIES = 1
"""A non-streamed answer whose server (a replica) went away mid-answer is generated again this many times: the
client has received nothing yet, and a replica set has already taken the dead replica out of rotation."""


class ChatService:
    """Runs prepared requests on the chat model (blocking work in threads; results are logged)."""

    def __init__(self, chat_model: EngineChatModel) -> None:
        self.chat_model = chat_model

    def _model_for(self, adapter: AdapterChoice) -> EngineChatModel:
        """The chat model for one request. Only default traffic (the active adapter) feeds shadow mode: a
        request that names another model would compare the shadow with the wrong live answer."""
        if adapter is ACTIVE:
            return self.chat_model
        update: dict[str, Any] = {"adapter": adapter}
        if adapter != self.chat_model.engine.active_adapter:
            update["shadow"] = None
        return self.chat_model.model_copy(update=update)

    def _call_kwargs(self, req: PreparedRequest, seed: int | None) -> dict[str, Any]:
        kwargs = dict(req.kwargs)
        if seed is not None:
            kwargs["seed"] = seed
        if req.stop:
            kwargs["stop"] = req.stop
        return kwargs

    async def complete(self, req: PreparedRequest, *, deadline: Deadline | None = None,
                       disconnected: Callable[[], Awaitable[None]] | None = None) -> list[Completion]:
        """All ``n`` choices (choice i samples with ``seed + i``), each generated as a stream so that it stops at
        the next token when the client goes away (``disconnected`` returns; :class:`ClientGone` is raised) or
        the ``deadline`` passes (a 504 :class:`APIError`)."""
        out: list[Completion] = []
        current: list[StreamHandle] = []

        async def watch() -> None:
            await disconnected()  # type: ignore[misc]
            if current:
                current[-1].abort("gone")

        watcher = asyncio.create_task(watch()) if disconnected is not None else None
        try:
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i
                for attempt in range(1 + MID_ANSWER_RETRIES):
                    handle = StreamHandle(self._model_for(req.adapter), req, self._call_kwargs(req, seed),
                                          deadline=deadline)
                    current.append(handle)
                    if watcher is not None and watcher.done():
                        raise ClientGone()
                    try:
                        await handle.start()
                        async for _ in handle.events():
                            pass
                    except APIError as exc:  # a ServerConnectionError arrives translated (503)
                        if not isinstance(exc.__cause__, ServerConnectionError) or attempt == MID_ANSWER_RETRIES:
                            raise
                        log.warning("the engine's server failed during an answer (%s); generating it again",
                                    exc.__cause__)
                        continue
                    break
                assert handle.result is not None
                out.append(handle.result)
        finally:
            if watcher is not None:
                watcher.cancel()
        return out

    async def stream(self, req: PreparedRequest, *, deadline: Deadline | None = None) -> StreamHandle:
        """Start streaming one choice; raises the API error at once if the request cannot start."""
        handle = StreamHandle(self._model_for(req.adapter), req, self._call_kwargs(req, req.seed), deadline=deadline)
        await handle.start()
        return handle


class ClientGone(Exception):
    """The client disconnected before its answer was complete; the generation was stopped."""


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered by (``time.monotonic()`` seconds), and the timeout it came from."""

    at: float
    timeout_s: float

    @classmethod
    def for_request(cls, config_timeout_s: float, client_timeout: str | None) -> Deadline:
        """The server's ``engine.request_timeout_s``, or the client's shorter timeout (the OpenAI SDK sends it
        as ``X-Stainless-Timeout``, in seconds); an unreadable client value is ignored."""
        timeout = config_timeout_s
        try:
            sent = float(client_timeout) if client_timeout else None
        except ValueError:
            sent = None
        if sent is not None and 0 < sent < timeout:
            timeout = sent
        return cls(time.monotonic() + timeout, timeout)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self) -> APIError:
        return APIError(504, f"The request did not finish within its deadline of {self.timeout_s:g} s (the server's "
                        "engine.request_timeout_s, or the client's timeout); its generation was stopped. Ask for "
                        "fewer tokens, or retry when the server is less busy.", code="deadline_exceeded")


class StreamHandle:
    """One streamed choice: a producer thread runs the chat model's stream, the event loop reads deltas.

    ``deltas()`` yields text; afterwards :attr:`result` holds the :class:`Completion` (with the logged
    interaction id). Leaving the iteration early (client gone) stops the producer between tokens.
    """

    def __init__(self, model: EngineChatModel, req: PreparedRequest, kwargs: dict[str, Any], *,
                 deadline: Deadline | None = None) -> None:
        self._model = model
        self._req = req
        self._kwargs = kwargs
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stop = threading.Event()
        self._first: tuple[str, Any] | None = None
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self.result: Completion | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        put: Callable[[tuple[str, Any]], None] = lambda item: loop.call_soon_threadsafe(  # noqa: E731
            self._queue.put_nowait, item)
        if self._deadline is not None:
            self._timer = loop.call_later(max(self._deadline.remaining(), 0.0), self.abort, "deadline")
        threading.Thread(target=self._produce, args=(put,), name="chat-stream", daemon=True).start()
        first = await self._queue.get()
        try:
            self._check(first)
        except BaseException:
            if self._timer is not None:
                self._timer.cancel()
            self.cancel()
            raise
        self._first = first

    def abort(self, why: str) -> None:
        """Stop the producer at its next token and end :meth:`events` with ``why`` (``gone``: the client left;
        ``deadline``: the request ran out of time). Call on the event loop."""
        self._stop.set()
        self._queue.put_nowait((why, None))

    def _check(self, item: tuple[str, Any]) -> None:
        kind, value = item
        if kind == "error":
            _raise_translated(value)
        elif kind == "gone":
            raise ClientGone()
        elif kind == "deadline":
            raise self._deadline.error()  # type: ignore[union-attr]

    def _produce(self, put: Callable[[tuple[str, Any]], None]) -> None:
        iterator = self._model.stream(self._req.messages, self._req.config, **self._kwargs)
        final: AIMessageChunk | None = None
        parts: list[str] = []
        try:
            for chunk in iterator:
                if self._stop.is_set():
                    return
                meta = chunk.response_metadata or {}
                if meta.get(INTERACTION_ID_KEY) is not None or meta.get("finish_reason") is not None:
                    final = chunk if final is None else final + chunk
                    continue
                text = chunk.text if isinstance(chunk.content, list) else str(chunk.content)
                if text:
                    parts.append(text)
                    put(("delta", text))
            result = _completion(final) if final is not None else Completion("", "stop", 0, 0, None, None)
            result.text = "".join(parts)
            put(("final", result))
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            put(("error", exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def cancel(self) -> None:
        """Stop the producer at the next token (the client went away)."""
        self._stop.set()

    async def events(self) -> AsyncIterator[str]:
        """The text deltas, in order; at the end :attr:`result` is set. Errors are raised as they come."""
        item = self._first
        self._first = None
        try:
            while True:
                if item is None:
                    item = await self._queue.get()
                kind, value = item
                item = None
                if kind == "delta":
                    yield value
                elif kind == "final":
                    self.result = value
                    return
                else:
                    self._check((kind, value))
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.cancel()
