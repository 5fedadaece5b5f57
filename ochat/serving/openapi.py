"""The OpenAPI document (/openapi.json) from the pydantic protocol models.

The POST routes read their bodies themselves (size limit, JSON checks, errors naming the field), so
FastAPI does not see a body parameter; `body()` declares the request body and the responses (success,
stream, every error in OpenAI's shape) for the document, and `install_openapi` adds the request models'
schemas to its components."""

from __future__ import annotations

import typing
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ochat.serving import protocol as P

ERROR_DESCRIPTIONS = {
    400: "Invalid request (the message names the field); also fields this server does not support",
    401: "Missing or wrong API key (with --api-keys)", 403: "Host not allowed (DNS-rebinding check)",
    404: "No such model", 408: "The request body did not arrive in time", 413: "Request body too large",
    415: "The body is not application/json", 429: "Request queue full; retry", 500: "Server or engine error",
    503: "Engine not running (shutting down or restarting)", 504: "The request ran past --request-timeout-s",
}
POST_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 500, 503, 504)
REF = "#/components/schemas/{model}"
# The request models that `body()` documented, by name: their schemas go into the document's components.
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": P.ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def _members(request: Any) -> list[type[BaseModel]]:
    return list(typing.get_args(request)) or [request]


def body(request: Any, response: type[BaseModel], stream: bool = False, chunk_name: str = "") -> dict[str, Any]:
    """Route keywords documenting `request` (a model or a union of models) as the JSON body and `response`
    as the answer (with `stream`: also text/event-stream, one `data:` JSON chunk per event, then [DONE])."""
    _BODY_MODELS.update((m.__name__, m) for m in _members(request))
    refs = [{"$ref": REF.format(model=m.__name__)} for m in _members(request)]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    ok: dict[str, Any] = {"model": response, "description": "Success"}
    if stream:
        event = {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "description": f"a {chunk_name} as JSON, an error object, or [DONE] (the last event)"}}}
        ok["content"] = {"text/event-stream": {"schema": event}}
        ok["description"] = "Success; with `stream: true` server-sent events"
    return {"openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
            "responses": {200: ok, **responses(*POST_ERRORS)}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in _BODY_MODELS.values():
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
