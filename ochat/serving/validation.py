"""Checks at the edge: a request body becomes a pydantic request or a 400 that names the field.

Before pydantic sees it, the JSON itself is checked: UTF-8, no NaN/Infinity, no integer longer than
MAX_INT_DIGITS, no nesting deeper than MAX_DEPTH, no lone surrogate in a string (`"\\ud800"` is valid
JSON yet no text). Then fields that ochat does not implement and that would change what the answer must
be (`response_format`, `tools`, `logit_bias`, ...) are refused as "not supported" rather than ignored;
any other unknown field is a harmless vendor extra and ignored."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ochat.serving.errors import APIError

if TYPE_CHECKING:
    from ochat.serving.served_model import ServeConfig

Req = TypeVar("Req", bound=BaseModel)
MAX_DEPTH = 32
MAX_INT_DIGITS = 40
_SURROGATE = re.compile("[\ud800-\udfff]")


def _off(v: Any) -> bool:
    return v is None or v is False or v == [] or v == {} or v == ""


# field -> "this value leaves the answer unchanged" (the value an OpenAI client sends by default)
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "response_format": lambda v: _off(v) or v == {"type": "text"},
    "tools": _off,
    "tool_choice": lambda v: _off(v) or v == "none",
    "functions": _off,
    "function_call": lambda v: _off(v) or v == "none",
    "logit_bias": _off,
    "best_of": lambda v: v is None or v == 1,
    "suffix": _off,
    "audio": _off,
    "modalities": lambda v: _off(v) or v == ["text"],
    "prediction": _off,
    "min_tokens": lambda v: v is None or v == 0,
    "min_p": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "use_beam_search": _off,
    "stop_token_ids": _off,
    "prompt_logprobs": _off,
    "guided_json": _off,
    "guided_regex": _off,
    "guided_choice": _off,
    "guided_grammar": _off,
    "structured_outputs": _off,
}
CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": _off,
    "add_generation_prompt": lambda v: v is None or v is True,
    "continue_final_message": _off,
}


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _BadNumber(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_constant(text: str) -> float:
    raise _BadNumber(f"{text} is not a JSON number")


def loads(body: bytes) -> Any:
    """JSON from a request body; 400 for anything that is not plain UTF-8 JSON of sane size and depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8: {e}", code="invalid_json") from None
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except _BadNumber as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)",
                       code="invalid_json") from None


def check_json(data: Any) -> None:
    """Depth and lone surrogates, walking the whole body without recursion; 400 naming the path."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"{path or 'body'}: nested more than {MAX_DEPTH} levels deep", param=path or None)
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(400, f"{path or 'body'}: a lone UTF-16 surrogate is not text", param=path or None)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _SURROGATE.search(k):
                    raise APIError(400, f"{path or 'body'}: a key holds a lone UTF-16 surrogate", param=path or None)
                stack.append((v, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}", depth + 1) for i, v in enumerate(value))


def check_supported(data: dict, table: dict[str, Callable[[Any], bool]]) -> None:
    for name, harmless in table.items():
        if name in data and not harmless(data[name]):
            raise APIError(400, f"{name}: not supported by this server (see README: 'Not supported')",
                           param=name, code="unsupported_parameter")
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):  # a non-list fails validation later
        if not isinstance(m, dict):
            continue
        if not _off(m.get("tool_calls")) or not _off(m.get("function_call")):
            raise APIError(400, f"messages.{i}.tool_calls: not supported by this server", param=f"messages.{i}",
                           code="unsupported_parameter")
        content = m.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type", "text") != "text":
                raise APIError(400, f"messages.{i}.content.{j}.type: only text parts are supported (got "
                                    f"{str(part.get('type'))[:40]!r})", param=f"messages.{i}.content.{j}.type",
                               code="unsupported_parameter")


def _field_path(loc: tuple) -> str:
    """A pydantic error location without the union-member tags it inserts ('str', 'list[str]', ...)."""
    parts = [str(x) for x in loc if not (isinstance(x, str) and (x[:1].islower() and ("[" in x or x in _TAGS)))]
    return ".".join(parts)


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int"}


def validate(model: type[Req], data: Any, unsupported: dict[str, Callable[[Any], bool]] | None = None) -> Req:
    """`data` (parsed JSON) as `model`, after the JSON and not-supported checks; 400 naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the JSON body must be an object")
    check_json(data)
    check_supported(data, {**UNSUPPORTED, **(unsupported or {})})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = max(errors, key=lambda x: len(x["loc"]))          # the most specific (unions list every member)
        loc = _field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None) from None


async def read_body(request: Request, max_bytes: int) -> bytes:
    size = request.headers.get("content-length") or "0"
    if not size.isdigit():
        raise APIError(400, "Content-Length: expected a number of bytes")
    if int(size) > max_bytes:
        raise APIError(413, f"request body of {size} bytes is over the limit of {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body is over the limit of {max_bytes} bytes")
    return bytes(body)


async def parse_request(request: Request, model: type[Req], config: "ServeConfig",
                        unsupported: dict[str, Callable[[Any], bool]] | None = None) -> Req:
    """The JSON body of `request` as `model`; any problem is a 400 naming the field (413 when too large,
    408 when the body does not arrive within --body-timeout-s)."""
    return validate(model, await read_json(request, config), unsupported)


async def read_json(request: Request, config: "ServeConfig") -> Any:
    """The parsed JSON body (checked by `loads`); 408 when it does not arrive within --body-timeout-s."""
    try:
        async with asyncio.timeout(config.body_timeout_s):
            body = await read_body(request, config.max_body_bytes)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                       code="body_timeout", headers={"Connection": "close"}) from None
    return loads(body)
