"""What chat and completion serving share (vLLM's `serving_engine.py`): reading and checking a request,
its sampling parameters, admission, running its choices, logprobs, and the request's log record.

A request's life: `validation.parse_request` (body -> pydantic model) -> `OpenAIServing.sampling_params` (checks
against the model and the server's limits) -> `start` (admission, one engine stream per choice) -> the
chat or completion module's full or streaming generator, which ends in `finish_record`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring as encode_json_string   # "..." with non-ASCII kept, as pydantic
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from ochat.serving import protocol as P
from ochat.serving.engine import EngineDeadError, QueueFullError, RequestFailedError, SamplingParams, TokenLogprob
from ochat.serving.errors import APIError, engine_error, queue_full
from ochat.serving.generation import ChoiceDelta, generate_choice, merge_choices
from ochat.serving.metrics import ModelMetrics, ServerMetrics
from ochat.serving.served_model import ServeConfig, ServedModel
from ochat.serving.serving_models import ServingModels

T = TypeVar("T")
AnyRequest = P.ChatCompletionRequest | P.CompletionRequest
OFF_LOOP_CHARS = 4096
LOGPROB_FLOOR = -9999.0         # vLLM's: JSON has no -inf
_pool: ThreadPoolExecutor | None = None


async def off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` (tokenizing or templating `size` characters): inline when small, else in a worker thread
    so that the event loop (/health, other requests' tokens) keeps answering meanwhile."""
    if size <= OFF_LOOP_CHARS:
        return fn(*args)
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(2, thread_name_prefix="ochat-tokenize")
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


def _escape_line_breaks(text: str) -> str:
    """U+2028, U+2029 and U+0085 escaped: some SSE clients split lines at them."""
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return text


def sse(chunk: BaseModel) -> str:
    """One server-sent event."""
    return f"data: {_escape_line_breaks(chunk.model_dump_json(exclude_unset=True))}\n\n"


TEXT_SLOT = "\x00ochat-text-slot\x00"       # stands for a delta's text in a pre-serialised event
_TEXT_SLOT_JSON = json.dumps(TEXT_SLOT)


class TextEventTemplate:
    """The SSE event of a text-only delta, serialised once by its pydantic model (`build(text)`) and then
    filled with each delta's text: one string join instead of building and dumping the models per token
    (~1.5 us vs ~10 us a chunk). The result is the bytes `sse(build(text))` gives (tests/test_serving_edge.py)."""

    def __init__(self, build: Callable[[str], BaseModel]):
        self.build = build
        parts = sse(build(TEXT_SLOT)).split(_TEXT_SLOT_JSON)
        # A slot found elsewhere too (a model name holding it): every event goes through pydantic.
        self.head, self.tail = (parts[0], parts[1]) if len(parts) == 2 else (None, None)

    def event(self, text: str) -> str:
        if self.head is None:
            return sse(self.build(text))
        return self.head + _escape_line_breaks(encode_json_string(text)) + self.tail


def error_event(e: APIError) -> str:
    return f"data: {json.dumps(e.body().model_dump())}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


@dataclass
class Generation:
    """One admitted request: its choices' merged stream and what its response and log record need."""

    served: ServedModel
    req: AnyRequest
    request_id: str
    stream: AsyncIterator[ChoiceDelta]
    prompts_ids: list[list[int]]
    prompt_tokens: int
    started: float
    record: dict[str, Any]
    metrics: ModelMetrics                 # the series of `served` (one per model on a multi-model server)
    timeout_s: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    templates: dict[int, TextEventTemplate] = field(default_factory=dict)    # per choice index

    @property
    def n_choices(self) -> int:
        return len(self.prompts_ids) * self.req.n

    def prompt_ids_of(self, index: int) -> list[int]:
        return self.prompts_ids[index // self.req.n]

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def chunk(self, chunk_type: type[P.ChatCompletionChunk] | type[P.CompletionChunk], choices: list,
              usage: P.UsageInfo | None = None) -> str:
        """One streamed event of this request; with include_usage every chunk has `usage` (null until the last)."""
        return sse(self.chunk_model(chunk_type, choices, usage))

    def chunk_model(self, chunk_type: type[P.ChatCompletionChunk] | type[P.CompletionChunk], choices: list,
                    usage: P.UsageInfo | None = None) -> P.ChatCompletionChunk | P.CompletionChunk:
        extra = {"usage": usage} if self.include_usage else {}
        return chunk_type(id=self.request_id, object=chunk_type.model_fields["object"].default,
                          created=self.created, model=self.req.model, choices=choices, **extra)

    def text_event(self, index: int, text: str, build: Callable[[str], BaseModel]) -> str:
        """The event of choice `index`'s text-only delta `text`; `build(text)` is its chunk model (the same for
        every delta of the choice but the text)."""
        template = self.templates.get(index)
        if template is None:
            template = self.templates[index] = TextEventTemplate(build)
        return template.event(text)


@dataclass
class Choice:
    """One choice of a non-streaming response, accumulated from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def engine_failure(d: ChoiceDelta) -> APIError | None:
    """The error a client gets for a choice the engine could not finish (None when it finished)."""
    if d.finish_reason == "abort":
        return APIError(503, "the server is shutting down or the engine failed; retry", code="aborted")
    return None


# What an admitted request can fail with; `as_api_error` maps each to the client's error.
REQUEST_ERRORS = (APIError, QueueFullError, EngineDeadError, RequestFailedError, TimeoutError)


def as_api_error(e: Exception, gen: Generation) -> APIError:
    """The error a client gets for a request that failed after admission (one of REQUEST_ERRORS), streamed (an
    error event) or not: one mapping for both."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return queue_full()
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead", headers={"Retry-After": "2"})
    if isinstance(e, RequestFailedError):
        return engine_error(e)
    return request_timeout(gen)


def request_timeout(gen: Generation) -> APIError:
    return APIError(504, f"the request did not finish within the server's limit of {gen.timeout_s:g} s "
                         f"(--request-timeout-s)", "timeout_error", code="request_timeout")


class OpenAIServing:
    def __init__(self, models: ServingModels, config: ServeConfig, metrics: ServerMetrics, log: logging.Logger):
        self.models, self.config, self.metrics, self.log = models, config, metrics, log

    # -- checks ---------------------------------------------------------------------------------
    def check_capacity(self, req: AnyRequest, n_prompts: int, prompt_field: str) -> None:
        """n per prompt and prompts x n against what this server can ever hold (before any tokenizing)."""
        if req.n > self.config.max_n:
            raise APIError(400, f"n: at most {self.config.max_n} choices per request (got {req.n})", param="n")
        capacity = self.config.max_num_seqs + self.config.max_queue
        if n_prompts * req.n > capacity:
            raise APIError(400, f"{prompt_field}: {n_prompts} prompts x n={req.n} is {n_prompts * req.n} sequences; "
                                f"this server holds at most {capacity} (--max-num-seqs + --max-queue)",
                           param=prompt_field)

    def sampling_params(self, served: ServedModel, req: AnyRequest, prompt_len: int, logprobs: int | None,
                        prompt_field: str) -> SamplingParams:
        """The engine's parameters for `req`, after checking it against the context and the limits."""
        context = served.max_model_len
        if prompt_len >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                                f"{prompt_field} resulted in {prompt_len} tokens.", param=prompt_field,
                           code="context_length_exceeded")
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens > served.max_tokens_limit:
            raise APIError(400, f"max_tokens: at most {served.max_tokens_limit} (got {max_tokens})",
                           param="max_tokens")
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, {max_tokens} "
                                f"in the completion).", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(served.max_tokens_limit, context - prompt_len)
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                              seed=req.seed, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logprobs=logprobs, ignore_eos=req.ignore_eos)

    @staticmethod
    def stop_strings(req: AnyRequest) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > P.MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {P.MAX_STOP_STRINGS} stop strings", param="stop")
        return [s for s in stop if s]

    # -- running --------------------------------------------------------------------------------
    def start(self, served: ServedModel, req: AnyRequest, prompts_ids: list[list[int]], params: SamplingParams,
              id_prefix: str) -> Generation:
        """Admit the request (429 when the queue is full) and start one engine stream per choice."""
        n_total = len(prompts_ids) * req.n
        engine = served.engine
        if not engine.can_accept(0):
            raise APIError(503, "the engine is not running (shutting down or restarting); retry",
                           code="engine_unavailable", headers={"Retry-After": "5"})
        if not engine.can_accept(n_total):
            raise queue_full()
        stop = self.stop_strings(req)
        request_id = P.random_id(id_prefix)
        streams = []
        for p, ids in enumerate(prompts_ids):
            for i in range(req.n):
                index = p * req.n + i
                # n choices differ, yet each is reproducible: choice i samples with seed + i
                choice_params = replace(params, stop_token_ids=list(params.stop_token_ids),
                                        seed=None if req.seed is None else req.seed + i)
                streams.append(generate_choice(engine, served.tokenizer, index, ids, choice_params, stop,
                                               f"{request_id}-{index}"))
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        metrics = self.metrics.model(served.name)
        metrics.prompt_tokens.inc(prompt_tokens)
        record = {"event": "request", "id": request_id, "model": req.model, "n": req.n, "stream": req.stream,
                  "prompt_tokens": prompt_tokens, "max_tokens": params.max_tokens, "user": req.user}
        return Generation(served, req, request_id, merge_choices(streams), prompts_ids, prompt_tokens,
                          time.monotonic(), record, metrics, self.config.request_timeout_s)

    def _count(self, gen: Generation, d: ChoiceDelta, first: bool) -> bool:
        """Count a delta in the metrics; returns whether the first token is still to come."""
        if first and d.token_ids:
            gen.metrics.ttft.observe(time.monotonic() - gen.started)
            first = False
        gen.metrics.generation_tokens.inc(len(d.token_ids))
        return first

    async def collect(self, gen: Generation) -> list[Choice]:
        """Run every choice to its end (non-streaming responses); APIError if the engine failed one."""
        choices = [Choice(i) for i in range(gen.n_choices)]
        first = True
        async with asyncio.timeout(gen.timeout_s), aclosing(gen.stream) as deltas:
            async for d in deltas:
                first = self._count(gen, d, first)
                failure = engine_failure(d)
                if failure is not None:
                    raise failure
                c = choices[d.index]
                c.text += d.text
                c.token_ids += d.token_ids
                c.logprobs += d.logprobs
                c.prompt_logprobs = c.prompt_logprobs or d.prompt_logprobs
                if d.finish_reason:
                    c.finish_reason = d.finish_reason
        return choices

    async def collect_until_disconnect(self, request: Request, gen: Generation) -> list[Choice] | Response:
        """`collect`, cancelled (aborting its engine requests) if the client goes away: then a 499."""
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(self.collect(gen))
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            try:
                return task.result()
            except REQUEST_ERRORS as e:
                raise as_api_error(e, gen) from None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.finish_record(gen, 0, ["client_disconnected"])
        gen.metrics.finished("abort")
        return Response(status_code=499)

    async def stream_events(self, gen: Generation, chunk_type: type[P.ChatCompletionChunk] | type[P.CompletionChunk],
                            opening: list[str], render: Callable[[ChoiceDelta], list[str]]) -> AsyncIterator[str]:
        """The SSE body of a streaming response: `opening`, the events `render` makes of each delta, the
        usage event (stream_options.include_usage), [DONE]. A failure mid-stream is an error event, then [DONE]."""
        completion_tokens, reasons, first, finished_normally = 0, [], True, False
        try:
            # One body chunk per delta (its events joined): one socket write, not one per event.
            if opening:
                yield "".join(opening)
            async with asyncio.timeout(gen.timeout_s), aclosing(gen.stream) as deltas:
                async for d in deltas:
                    first = self._count(gen, d, first)
                    completion_tokens += len(d.token_ids)
                    failure = engine_failure(d)
                    if failure is not None:
                        raise failure
                    events = render(d)
                    if d.finish_reason:
                        reasons.append(d.finish_reason)
                    if events:
                        yield events[0] if len(events) == 1 else "".join(events)
            usage = gen.chunk(chunk_type, [], P.UsageInfo(prompt_tokens=gen.prompt_tokens,
                                                          completion_tokens=completion_tokens,
                                                          total_tokens=gen.prompt_tokens + completion_tokens)) \
                if gen.include_usage else ""
            yield usage + DONE_EVENT
            finished_normally = True
        except REQUEST_ERRORS as e:
            error = as_api_error(e, gen)
            gen.metrics.error(error.status)
            yield error_event(error)
            yield DONE_EVENT
            reasons = [f"error_{error.status}"]
        finally:
            # Also reached when the client disconnects (the stream is cancelled): `aclosing` has
            # already aborted the engine requests and freed their slots.
            if not finished_normally and not reasons:
                reasons = ["client_disconnected"]
                gen.metrics.finished("abort")
            self.finish_record(gen, completion_tokens, reasons)

    @staticmethod
    def usage(gen: Generation, choices: list[Choice]) -> P.UsageInfo:
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return P.UsageInfo(prompt_tokens=gen.prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=gen.prompt_tokens + completion_tokens)

    def finish_record(self, gen: Generation, completion_tokens: int, reasons: list[str]) -> None:
        """Count the finish reasons and log the request's record (unless --disable-log-requests)."""
        latency = time.monotonic() - gen.started
        for r in reasons:
            if r in ("stop", "length"):
                gen.metrics.finished(r)
        if all(r in ("stop", "length") for r in reasons):
            gen.metrics.e2e.observe(latency)
        if not self.config.disable_log_requests:
            self.log.info("request", extra={**gen.record, "completion_tokens": completion_tokens,
                                            "finish_reasons": reasons, "latency_s": round(latency, 4)})


# -- logprobs in OpenAI's two shapes --------------------------------------------------------------
def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(served: ServedModel, items: list[tuple[int, TokenLogprob]]) -> P.ChatLogprobs:
    content = []
    for tok, lp in items:
        text = served.token_text(tok)
        top = [P.TopLogprob(token=served.token_text(t), logprob=_lp(v), bytes=list(served.token_text(t).encode()))
               for t, v in lp.top]
        content.append(P.ChatLogprob(token=text, logprob=_lp(lp.logprob), bytes=list(text.encode()),
                                     top_logprobs=top))
    return P.ChatLogprobs(content=content)


def completion_logprobs(served: ServedModel, items: list[tuple[int, TokenLogprob | None]],
                        offset: int = 0) -> P.CompletionLogprobs:
    """Legacy completions' logprobs; `offset`: where the first token's text starts in the choice's text.
    An item without a logprob (the first prompt token) is null. As in vLLM, each top_logprobs entry also
    holds the token itself."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for tok, lp in items:
        text = served.token_text(tok)
        tokens.append(text)
        token_logprobs.append(None if lp is None else _lp(lp.logprob))
        top_logprobs.append(None if lp is None else
                            {text: _lp(lp.logprob), **{served.token_text(t): _lp(v) for t, v in lp.top}})
        text_offset.append(offset)
        offset += len(text)
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                                text_offset=text_offset)
