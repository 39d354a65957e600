"""uvicorn's HTTP/1.1 protocol, answering requests it cannot parse in the API's error shape.

A request h11 refuses before the app sees it (headers over ``MAX_HEADER_BYTES``, a malformed request line)
gets uvicorn's bare ``400 Invalid HTTP request received.`` as plain text. :class:`JSONErrorH11Protocol`
answers the same requests with the status h11 suggests (431 for oversized headers) and an OpenAI-shaped
JSON error saying what to do, so a client shows the reason. Pass it to uvicorn as ``http=``.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_type

MAX_HEADER_BYTES = 16 * 1024
"""h11's limit on the request line and headers together (uvicorn's ``h11_max_incomplete_event_size``)."""

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


def protocol_error_body(exc: h11.RemoteProtocolError | None) -> tuple[int, bytes]:
    """The status and JSON body answering a request h11 refused with ``exc``."""
    status = exc.error_status_hint if exc is not None and exc.error_status_hint in _REASONS else 400
    if status == 431:
        message = (
            f"the request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB; send smaller headers "
            "(a request's content belongs in its body)"
        )
        code = "request_header_fields_too_large"
    else:
        detail = str(exc) if exc is not None and str(exc) else "malformed HTTP/1.1 request"
        message = f"invalid HTTP request ({detail}); send a well-formed HTTP/1.1 request"
        code = "invalid_http_request"
    body = {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}
    return status, json.dumps(body).encode()


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose refusals of unparseable requests are JSON errors with h11's status."""

    _protocol_error: h11.RemoteProtocolError | None = None

    def handle_events(self) -> None:
        conn = self.conn
        receive = conn.next_event

        def next_event() -> Any:
            try:
                return receive()
            except h11.RemoteProtocolError as exc:
                self._protocol_error = exc
                raise

        conn.next_event = next_event  # type: ignore[method-assign]
        try:
            super().handle_events()
        finally:
            del conn.next_event

    def send_400_response(self, msg: str) -> None:
        status, body = protocol_error_body(self._protocol_error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers,
                                                         reason=_REASONS[status])))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   grace_s: float | None = None, **options: Any) -> Any:
    """The ``uvicorn.Config`` ``runtime serve`` runs with: this protocol and its header limit; ``grace_s`` is how
    long a stop waits for requests in flight before cancelling them (``options`` are further ``uvicorn.Config``
    arguments)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=JSONErrorH11Protocol,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=grace_s,
                          **options)


def graceful_server(config: Any) -> Any:
    """A ``uvicorn.Server`` for ``config`` that stops gracefully on SIGTERM or SIGINT and at once on a second
    signal of either kind (uvicorn forces only on a second SIGINT).

    On the first signal it stops accepting, lets requests in flight finish for up to the config's grace
    period, cancels the rest (the engine stops their generations at the next token when it closes), then
    runs the app's shutdown: the learning loop stops, the store is flushed, the engine closes."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                self.force_exit = True
            super().handle_exit(sig, frame)

    return GracefulServer(config)
