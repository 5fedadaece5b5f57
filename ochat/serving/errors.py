"""Errors of the HTTP API: one exception type and one response shape, OpenAI's
{"error": {"message", "type", "param", "code"}}. Every failure, whatever raised it, leaves through here."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ochat.serving import protocol as P
from ochat.serving.metrics import ServerMetrics

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and OpenAI error fields to answer it with."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> P.ErrorResponse:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return APIError(status, message, type, param, code, headers).response()


def queue_full() -> APIError:
    return APIError(429, "The server is busy (request queue full); retry shortly", code="queue_full",
                    headers={"Retry-After": "1"})


def engine_error(e: Exception) -> APIError:
    """The engine failed (500) or refused (4xx, its own message) this one request; the others are unaffected."""
    status = getattr(e, "status", 500)
    if 400 <= status < 500:
        return APIError(status, str(e), param=getattr(e, "param", None))
    return APIError(500, f"the engine failed this request: {e}", "server_error", code="engine_error")


def install_error_handlers(app: FastAPI, metrics: ServerMetrics, log: logging.Logger) -> None:
    """Route every exception of a request to an OpenAI-shaped error response (and count it)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.status)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        metrics.error(400)
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        metrics.error(500)
        return error_response(500, "internal server error (see the server log)", "server_error")
