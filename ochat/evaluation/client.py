"""Calls to OpenAI-compatible endpoints: retries with backoff, bounded concurrency, progress.

openai's own retries are turned off so that every failure (transport, 5xx, 429, an unusable reply)
goes through one policy and is recorded per item instead of aborting the run.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import openai
from tqdm.auto import tqdm

from ochat.errors import OchatError

T = TypeVar("T")


class Unusable(Exception):
    """The endpoint answered, but not with something we can use (e.g. an unparseable judgment)."""


@dataclass
class RetryPolicy:
    attempts: int = 4          # total tries per call
    backoff: float = 1.0       # first wait in seconds; doubles each time, with jitter
    max_backoff: float = 30.0

    def wait(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2 ** attempt)
        return base * (0.5 + random.random() / 2)


# Errors that no retry can fix and that would hit every request alike: stop the whole run.
FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
# Errors of this one request (e.g. prompt longer than the context): record it, do not retry.
PERMANENT = (openai.BadRequestError, openai.UnprocessableEntityError)


def make_client(api_base: str | None, timeout: float = 600.0) -> openai.AsyncOpenAI:
    key = os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers without --api-keys accept any key
    return openai.AsyncOpenAI(base_url=api_base, api_key=key, max_retries=0, timeout=timeout)


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy) -> tuple[T | None, str | None, int]:
    """Run `call` until it succeeds: (result, None, attempts) or (None, last error, attempts)."""
    error = None
    for attempt in range(policy.attempts):
        try:
            return await call(), None, attempt + 1
        except FATAL as e:
            raise OchatError(f"{type(e).__name__} from the endpoint: {_message(e)}") from None
        except PERMANENT as e:
            return None, f"{type(e).__name__}: {_message(e)}", attempt + 1
        except (openai.APIError, Unusable) as e:
            error = f"{type(e).__name__}: {_message(e)}"
        if attempt + 1 < policy.attempts:
            await asyncio.sleep(policy.wait(attempt))
    return None, error, policy.attempts


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e)[:500]


async def run_parallel(items: Iterable[Any], work: Callable[[Any], Awaitable[None]], parallel: int,
                       desc: str) -> None:
    """Run `work(item)` for all items, at most `parallel` at a time, with a progress bar."""
    items = list(items)
    sem = asyncio.Semaphore(max(1, parallel))
    bar = tqdm(total=len(items), desc=desc, unit="it", dynamic_ncols=True)

    async def one(item):
        async with sem:
            await work(item)
        bar.update(1)

    try:
        await asyncio.gather(*(one(i) for i in items))
    finally:
        bar.close()


async def chat(client: openai.AsyncOpenAI, model: str, messages: list[dict], temperature: float,
               max_tokens: int, extra_body: dict | None = None) -> str:
    resp = await client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                max_tokens=max_tokens, extra_body=extra_body or None)
    if not resp.choices or resp.choices[0].message.content is None:
        raise Unusable("reply without message content")
    return resp.choices[0].message.content
