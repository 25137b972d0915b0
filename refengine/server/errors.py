"""OpenAI's error JSON for every failure, and the HTTP status each refengine exception means.

Clients (the official SDKs, LangChain, curl scripts) branch on the status code and read
`{"error": {"message", "type", "param", "code"}}`; FastAPI's own 422 and 404 bodies would break them.
Schema violations are 400 `invalid_request_error`, as OpenAI returns them, not FastAPI's 422.
"""
from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from models.catalogue import UnknownModelError
from refengine.engine.sequence import ContextLengthError, RequestError
from refengine.runtime.api import DeviceFailure, Overloaded, ShuttingDown

CLIENT_CLOSED = 499  # nginx's status for a client that went away; only ever seen in metrics


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: Exception) -> APIError:
    """The OpenAI error an exception from the runtime or the server stands for; anything unexpected
    is a 500 whose message still says what went wrong."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownModelError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    if isinstance(exc, Overloaded):
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return APIError(429, str(exc), type="rate_limit_error", code="overloaded", headers={"Retry-After": retry_after})
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, DeviceFailure):
        return APIError(500, str(exc), type="server_error", code="device_failure")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """A body that is not JSON, or JSON that does not fit the schema: one problem, one line. Of the
    errors pydantic reports for a union (one per member), the deepest is the one the client most
    likely meant (`stop: ["a", ""]` is a list with an empty string, not a bad string)."""
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [part for part in first["loc"] if part != "body"]
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first['msg']}")
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _field_path(loc)).lstrip(".")
    return APIError(400, f"invalid {path!r}: {first['msg']}", param=str(loc[0]))


def _field_path(loc: list[str | int]) -> list[str | int]:
    """The location up to the first union-member tag pydantic inserts (`str`, `list[int]`, ...)."""
    for i, part in enumerate(loc[1:], 1):
        if isinstance(part, str) and (part in {"str", "int", "float", "bool"} or any(c in part for c in "[-")):
            return loc[:i]
    return loc


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":     # FastAPI reads only JSON bodies: say so, not "not an object"
            return APIError(400, f"the request body must be JSON, sent with Content-Type: application/json "
                                 f"(got {kind or 'no Content-Type'})").response()
        return validation_error(exc).response()

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()

    # Each expected class by name: a handler for plain Exception runs in Starlette's outermost
    # middleware, which re-raises after answering and so loses the connection.
    for cls in (APIError, UnknownModelError, RequestError, Overloaded, ShuttingDown, DeviceFailure, Exception):
        app.add_exception_handler(cls, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
