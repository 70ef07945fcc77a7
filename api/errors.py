"""The one error shape of the HTTP API, and the one place exceptions become it.

Every error answer is ``{"error": {"status": 404, "code": "not_found", "message": "..."}}``::

    NotFound                 -> 404 not_found        ("unknown code 'X'")
    request validation       -> 422 invalid_parameter ("query parameter 'limit': ...")
    ValueError               -> 422 invalid_parameter (a query rejected an option)
    DatasetError             -> 400 bad_dataset
    StoreError               -> 503 store_unavailable
    ApiError                 -> its own status and code (401 unauthorized, 403 read_only)
    other ChannelgraphError  -> 400 bad_request
    HTTP errors of routing   -> their status (404 not_found, 405 method_not_allowed)
    anything else            -> 500 internal_error (logged with its traceback)

A browser view (a path under /views) answers the same status and message as an HTML page.
Messages are cut to MAX_MESSAGE characters (they may quote what the client sent).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import views
from api.params import is_page
from graph.errors import ChannelgraphError, DatasetError, NotFound, StoreError

log = logging.getLogger(__name__)
MAX_MESSAGE = 300  # characters of an error message; a long id it quotes is cut


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status of the answer.")
    code: str = Field(description="Stable machine-readable error code, e.g. not_found, invalid_parameter.")
    message: str = Field(description="What went wrong, for people; names the offending value.")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class ApiError(ChannelgraphError):
    """An error that belongs to the HTTP layer (authentication, read-only mode)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 413: "too_large", 415: "unsupported_media_type",
                 422: "invalid_parameter", 500: "internal_error", 503: "store_unavailable"}


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": message}}


def brief(message: str) -> str:
    """`message` on one line, cut to MAX_MESSAGE characters."""
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 1] + "…"


def _answer(status: int, code: str, message: str, headers: dict[str, str] | None = None,
            request: Request | None = None) -> Response:
    """The error answer: JSON, or for a browser view's request an HTML page."""
    if request is not None and is_page(request.url.path):
        service = getattr(request.app.state, "service", None)
        page = views.error_page(status, brief(message), path=request.url.path, source=service.uri if service else "")
        return HTMLResponse(page.html, status_code=status, headers=headers)
    return Response(orjson.dumps(error_body(status, code, brief(message))), status_code=status,
                    headers=headers, media_type="application/json")


def classify(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error code of an exception the application raised."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(exc, NotFound):
        return 404, "not_found"
    if isinstance(exc, StoreError):
        return 503, "store_unavailable"
    if isinstance(exc, DatasetError):
        return 400, "bad_dataset"
    if isinstance(exc, ChannelgraphError):
        return 400, "bad_request"
    if isinstance(exc, ValueError):
        return 422, "invalid_parameter"
    return 500, "internal_error"


def validation_message(exc: RequestValidationError) -> str:
    """`query parameter 'limit': Input should be ...; ...` from FastAPI's error list."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = {"query": "query parameter", "path": "path parameter", "header": "header",
                 "body": "request body", "cookie": "cookie"}.get(loc[0], loc[0]) if loc else "request"
        name = ".".join(loc[1:])
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "missing":
            message = "is required"
        elif error.get("type") == "json_invalid":  # its location is a character position, no name
            name, message = "", f"not valid JSON ({error.get('ctx', {}).get('error', 'cannot be decoded')})"
        parts.append(f"{where} {name!r}: {message}" if name else f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 too_large, by
    its Content-Length before anything is read, or as soon as a streamed body passes it."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body larger than {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _answer(413, "too_large", message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:
                raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited, send)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the one error shape (see the module docstring)."""

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return _answer(422, "invalid_parameter", validation_message(exc), request=request)

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if status == 404 and detail == "Not Found":
            detail = f"no such path: {request.url.path}"
        elif status == 405:
            detail = f"method {request.method} not allowed on {request.url.path}"
        return _answer(status, _STATUS_CODES.get(status, f"http_{status}"), detail, getattr(exc, "headers", None), request)

    async def on_error(request: Request, exc: Exception) -> Response:
        status, code = classify(exc)
        if status >= 500 and code == "internal_error":
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
            return _answer(500, code, f"internal error ({type(exc).__name__}); see the server log", request=request)
        if code == "store_unavailable":
            log.warning("store unavailable on %s: %s", request.url.path, exc)
        return _answer(status, code, str(exc), request=request)

    app.openapi = _one_error_shape(app)  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(ChannelgraphError, on_error)
    app.add_exception_handler(ValueError, on_error)
    app.add_exception_handler(Exception, on_error)


def _one_error_shape(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The app's OpenAPI document with FastAPI's default 422 schema (HTTPValidationError, which
    this app never sends) replaced by ErrorResponse, for every router."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            default = "#/components/schemas/HTTPValidationError"
            for item in document.get("paths", {}).values():
                for operation in item.values():
                    for answer in operation.get("responses", {}).values():
                        schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                        if schema.get("$ref") == default:
                            schema["$ref"] = "#/components/schemas/ErrorResponse"
                            answer["description"] = "Invalid parameter: the message names the parameter"
            models = document.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                models.pop(name, None)
            shape = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(shape.pop("$defs", {}))
            models["ErrorResponse"] = shape
        return app.openapi_schema

    return openapi


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for `statuses`."""
    described = {400: "Bad request", 401: "Missing or wrong API key", 403: "Writes are disabled (no API key configured)",
                 404: "Not found: the message names the unknown code, party or value",
                 422: "Invalid parameter: the message names the parameter", 503: "The store cannot be read"}
    return {s: {"model": ErrorResponse, "description": described.get(s, "Error")} for s in statuses}
