"""Request size limits: body bytes (an ASGI middleware), messages, choices, stop strings and max_tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body, error_type


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Larger requests are refused with a 400/413 saying which limit.

    Attributes:
        max_body_bytes: the largest request body accepted.
        max_messages: the most messages in one chat completion.
        max_n: the most choices (``n``) in one chat completion.
        max_stop: the most stop strings.
        max_stop_chars: the longest stop string (transformers' stop-string matcher builds tables that grow with
            it: a 100,000-character stop string exhausted the memory of a 24 GB machine).
        max_tokens: the most new tokens one request may ask for; ``None`` = the engine's context length.
    """

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    max_tokens: int | None = None


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, by ``Content-Length`` or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send, declared)
                    return
        seen = 0

        async def limited_receive() -> Message:
            # A body sent without Content-Length (chunked) is counted as it arrives; the HTTPException
            # reaches the app's error handler, which answers 413 in OpenAI's shape.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, detail=self.message(seen))
            return message

        await self.app(scope, limited_receive, send)

    def message(self, size: int) -> str:
        """The error message for a body of ``size`` bytes."""
        return (f"The request body ({size} bytes or more) is over the server's limit of {self.max_bytes} "
                "bytes: send fewer or shorter messages (or start the server with a larger --max-body-bytes).")

    async def _reject(self, send: Send, size: int) -> None:
        body = json.dumps(error_body(self.message(size), type=error_type(413), code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

