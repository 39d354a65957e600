"""The HTTP conversation with one OpenAI-compatible server: its connections, its routes, and the translation of
transport failures and HTTP error answers into engine errors that say what to do.

:class:`OpenAIServerClient` knows nothing of engine semantics (adapter registries, batches, streams of text
deltas); :class:`~runtime.engines.openai_http.OpenAIHTTPEngine` builds those on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

import runtime.engines.openai_protocol as protocol
from runtime.engines.errors import AdapterLoadError, EngineError, UnknownAdapterError
from runtime.engines.http_errors import (
    ServerAdapterExistsError,
    ServerConnectionError,
    ServerContextLengthError,
    ServerError,
    ServerTimeoutError,
    UnsupportedOperationError,
)
from runtime.engines.served_adapters import RequestTarget

__all__ = ["OpenAIServerClient"]

log = logging.getLogger(__name__)


class OpenAIServerClient:
    """Requests to one server, with failures raised as engine errors.

    Args:
        base_url: the server's address, already normalised (see
            :func:`~runtime.engines.openai_protocol.normalise_base_url`).
        kind: the server's name in messages (``"vLLM"``, ``"SGLang"``).
        start_hint: a command line that starts the server (shown when it cannot be reached).
        lora_setup_hint: how to enable runtime LoRA loading (shown when its LoRA routes are missing).
        api_key: sent as ``Authorization: Bearer ...``.
        timeout: seconds to wait for an answer (and between two streamed chunks).
        connect_timeout: seconds to wait for a connection.
        max_concurrency: requests expected at the same time (sizes the connection pool).
        transport: an ``httpx`` transport to use instead of the network.

    Thread-safe (``httpx.Client`` is). After :meth:`close`, requests raise :class:`EngineError`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        kind: str,
        start_hint: str,
        lora_setup_hint: str,
        api_key: str | None,
        timeout: float,
        connect_timeout: float,
        max_concurrency: int,
        transport: httpx.BaseTransport | None,
    ) -> None:
        self.base_url = base_url
        self.kind = kind
        self.timeout = timeout
        self._start_hint = start_hint
        self._lora_setup_hint = lora_setup_hint
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self.closed = False

    def close(self) -> None:
        """Close the connections; requests started afterwards raise :class:`EngineError`."""
        self.closed = True
        self._client.close()

    # -- requests ---------------------------------------------------------------------------------------
    def send(self, method: str, path: str, body: Mapping[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        """Send a request (``body`` as JSON; ``kwargs`` go to ``httpx``) and return the answer, errors included;
        transport failures raise engine errors."""
        with self.transport_errors(method, path):
            return self._client.request(method, path, json=body, **kwargs)

    @contextmanager
    def stream(self, path: str, body: Mapping[str, Any]) -> Iterator[httpx.Response]:
        """POST ``body`` to ``path`` and yield the answer as it arrives; leaving the block closes the
        connection (which cancels the generation on the server). Transport failures, also while reading,
        raise engine errors."""
        with self.transport_errors("POST", path), self._client.stream("POST", path, json=body) as response:
            yield response

    def json(self, response: httpx.Response, path: str) -> Any:
        """The JSON body of the answer to ``path``; :class:`ServerError` when it is not JSON."""
        return protocol.response_json(response, path, server_kind=self.kind, base_url=self.base_url)

    def events(self, response: httpx.Response, path: str) -> Iterator[dict[str, Any]]:
        """The JSON payloads of a streamed answer to ``path`` (see
        :func:`~runtime.engines.openai_protocol.sse_events`)."""
        return protocol.sse_events(response.iter_lines(), path, server_kind=self.kind, base_url=self.base_url)

    def base_model(self, model: str | None) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]]:
        """The card of the served base model ``model`` (by default the first base model listed) and the cards
        of the adapters listed with it as their ``parent``, from ``GET /v1/models``.

        Raises:
            EngineError: the server lists no base model, or not ``model`` (the message lists those it has).
        """
        path = "/v1/models"
        response = self.send("GET", path)
        if response.is_error:
            raise self.http_error(response, "GET", path)
        data = self.json(response, path)
        listed = data.get("data") if isinstance(data, dict) else None
        cards = [c for c in listed or [] if isinstance(c, dict) and "id" in c]
        bases = [c for c in cards if not c.get("parent")]
        if not bases:
            raise EngineError(f"The {self.kind} server at {self.base_url} lists no models at {path}.")
        if model is None:
            card = bases[0]
        else:
            matches = [c for c in bases if c["id"] == model]
            if not matches:
                served = ", ".join(repr(c["id"]) for c in bases)
                raise EngineError(
                    f"The {self.kind} server at {self.base_url} does not serve {model!r}; it serves "
                    f"{served}. Pass one of these as model=, or leave model unset to use the first."
                )
            card = matches[0]
        return card, [c for c in cards if c.get("parent") == card["id"]]

    def tokenize(self, model: str, text: str, *, add_special_tokens: bool) -> tuple[list[int], int | None]:
        """The token ids of ``text`` under ``model``'s tokenizer and the context size the server reports
        with them (``None`` when it does not), from ``POST /tokenize``.

        Raises:
            UnsupportedOperationError: the server has no ``/tokenize``.
        """
        path = "/tokenize"
        body = {"model": model, "prompt": text, "add_special_tokens": add_special_tokens}
        response = self.send("POST", path, body)
        if protocol.route_missing(response):
            raise UnsupportedOperationError(
                f"The {self.kind} server at {self.base_url} has no {path} endpoint, so count_tokens() and "
                f"score() cannot run on it: update the server, or use TransformersEngine with the same model."
            )
        if response.is_error:
            raise self.http_error(response, "POST", path)
        data = self.json(response, path)
        context = data.get("max_model_len")
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise ServerError(f"The {self.kind} server's {path} answer has no token list: {str(data)[:300]}")
        return [int(t) for t in tokens], context if isinstance(context, int) and context > 0 else None

    # -- LoRA routes ------------------------------------------------------------------------------------
    def load_lora(self, route: str, name: str, server_name: str, path: str, **extra: Any) -> None:
        """POST ``{"lora_name": server_name, "lora_path": path, **extra}`` to ``route``.

        Raises:
            ServerAdapterExistsError: the server already has ``server_name``.
            AdapterLoadError: any other failure, unreachable server included (``name`` is the engine's name
                for the adapter, for the message).
        """
        try:
            response = self.send("POST", route, {"lora_name": server_name, "lora_path": path, **extra})
        except EngineError as exc:
            raise AdapterLoadError(f"Could not load adapter {name!r} from {path}: {exc}") from exc
        if protocol.route_missing(response):
            raise AdapterLoadError(self._lora_disabled(route, response.status_code))
        message = protocol.response_message(response)
        if response.is_success and protocol.reported_success(response):
            return
        if protocol.ALREADY_WORDS.search(message):
            raise ServerAdapterExistsError(message)
        raise AdapterLoadError(
            f"The {self.kind} server at {self.base_url} could not load adapter {name!r} from {path} "
            f"(HTTP {response.status_code}): {message}. The path must exist on the server's machine and the "
            f"adapter's rank must not exceed the server's --max-lora-rank; the engine's adapters are unchanged."
        )

    def unload_lora(self, route: str, name: str, server_name: str, *, missing_ok: bool) -> None:
        """POST ``{"lora_name": server_name}`` to ``route``; with ``missing_ok``, an answer that the server
        does not have it counts as done.

        Raises:
            EngineError: the route is missing; :class:`ServerError` for any other refusal.
        """
        response = self.send("POST", route, {"lora_name": server_name})
        if protocol.route_missing(response):
            raise EngineError(self._lora_disabled(route, response.status_code))
        if response.is_success and protocol.reported_success(response):
            return
        message = protocol.response_message(response)
        if missing_ok and protocol.MISSING_WORDS.search(message):
            log.info("The %s server no longer had adapter %r (%s)", self.kind, server_name, message)
            return
        raise ServerError(
            f"The {self.kind} server at {self.base_url} could not unload adapter {name!r} "
            f"(HTTP {response.status_code}): {message}",
            status_code=response.status_code,
            server_message=message,
        )

    def _lora_disabled(self, route: str, status: int) -> str:
        return (
            f"The {self.kind} server at {self.base_url} does not offer runtime LoRA loading "
            f"(POST {route} answered HTTP {status}). {self._lora_setup_hint}"
        )

    # -- errors -----------------------------------------------------------------------------------------
    @contextmanager
    def transport_errors(self, method: str, path: str) -> Iterator[None]:
        """Translate httpx's transport failures in the block into engine errors that say what to do."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServerTimeoutError(
                f"The {self.kind} server at {self.base_url} did not answer {method} {path} within "
                f"{self.timeout:g}s ({type(exc).__name__}): it may be overloaded or stuck (see its log), or the "
                f"request needs longer; raise the engine's timeout."
            ) from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise ServerConnectionError(
                f"Cannot reach the {self.kind} server at {self.base_url} ({method} {path}: {exc}). "
                f"Is it running? Start it with: {self._start_hint}"
            ) from exc
        except httpx.HTTPError as exc:
            if self.closed:
                raise EngineError("The engine is closed.") from exc
            raise ServerConnectionError(
                f"HTTP failure talking to the {self.kind} server at {self.base_url} ({method} {path}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except RuntimeError as exc:  # httpx raises this for a request on a closed client
            if self.closed and not isinstance(exc, EngineError):
                raise EngineError("The engine is closed.") from exc
            raise

    def http_error(self, response: httpx.Response, method: str, path: str) -> ServerError:
        """The engine error for an HTTP error answer, with a hint for the usual causes."""
        message = protocol.response_message(response)
        status = response.status_code
        if protocol.route_missing(response):
            hint = f" The server has no {path} endpoint: is {self.base_url} a {self.kind} server?"
        elif status in (401, 403):
            hint = " Check the API key (the server was started with --api-key)."
        elif status >= 500:
            hint = " This is a server-side failure: see the server's log."
        else:
            hint = ""
        return ServerError(
            f"The {self.kind} server at {self.base_url} answered {method} {path} with HTTP {status}: "
            f"{message}.{hint}",
            status_code=status,
            server_message=message,
        )

    def request_error(
        self,
        response: httpx.Response,
        method: str,
        path: str,
        target: RequestTarget,
        max_new_tokens: int,
        *,
        loaded: Callable[[], list[str]],
    ) -> EngineError:
        """The engine error for a failed generation or scoring request served by ``target``:
        :class:`ServerContextLengthError` when the request does not fit the context,
        :class:`UnknownAdapterError` when the server does not have the adapter (``loaded`` gives the engine's
        adapter names for it), else what :meth:`http_error` says."""
        message = protocol.response_message(response)
        status = response.status_code
        if protocol.is_context_length_error(status, message):
            return ServerContextLengthError(
                message,
                prompt_tokens=protocol.prompt_tokens_in(message),
                max_new_tokens=max_new_tokens,
                context=protocol.context_in(message),
            )
        if protocol.is_missing_adapter_error(status, message, target.server_name):
            error = UnknownAdapterError(target.name or str(target.server_name), loaded())
            error.args = (
                f"The {self.kind} server at {self.base_url} does not have adapter {target.name!r} "
                f"(served as {target.server_name!r}) loaded: {message}. Was the server restarted? Load it "
                f"again with load_adapter(name, path, replace=True).",
            )
            return error
        return self.http_error(response, method, path)
