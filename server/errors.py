"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, for every route.

Routes raise :class:`APIError`; :func:`install_error_handlers` turns it, FastAPI's validation errors
(malformed JSON, wrong field types) and plain HTTP errors into that shape, so an OpenAI client shows the
message instead of a parse failure.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status.

    Args:
        status: the HTTP status code.
        message: what went wrong and what to do about it.
        code: a stable machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        param: the request field at fault, if any.
        type: OpenAI's error type; derived from ``status`` when omitted.
        headers: extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)
        self.headers = headers


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response in OpenAI's shape."""
    body = error_body(message, type=error_type(status), code=code, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    body = error_body(exc.message, type=exc.type, code=exc.code, param=exc.param)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = f" ({ctx['error']})" if ctx.get("error") else ""
        return error_response(400, f"The request body is not valid JSON{detail}; send a JSON object.",
                              code="invalid_json")
    problems = []
    param = None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(400, "Invalid request: " + "; ".join(problems) + more, code="invalid_request",
                          param=param)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = "No such route; see /docs for the API (OpenAI routes are under /v1)."
    if exc.status_code == 405:
        message = f"{message}: this route does not take that HTTP method."
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's, for non-JSON errors
        message = ("The request body could not be read as JSON (not UTF-8, or nested too deeply); send a UTF-8 "
                   "JSON object.")
        code = "invalid_json"
    return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in a request", exc_info=exc)
    return error_response(500, f"Internal server error: {type(exc).__name__}: {exc}", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's error shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
