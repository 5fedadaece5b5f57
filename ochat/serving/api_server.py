"""The OpenAI-compatible HTTP API: `create_app(config)` builds the FastAPI app.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics,
and the web chat at / (ochat.ui.web, when installed). Every error, whatever raised it, leaves through
`error_response` in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager, aclosing
from typing import Any, AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ochat.errors import OchatError
from ochat.serving import protocol as P
from ochat.serving.engine import EngineDeadError, QueueFullError, SamplingParams, TokenLogprob
from ochat.serving.generation import ChoiceDelta, generate_choice, merge_choices
from ochat.serving.logs import app_logger
from ochat.serving.metrics import ServerMetrics
from ochat.serving.served_model import ServeConfig, ServedModel
from ochat.templates.conversation import conversation_from_openai

OPEN_PATHS = ("/health",)           # plus the web UI: "/" and "/ui/*"
Req = TypeVar("Req", bound=BaseModel)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


class ClientDisconnected(Exception):
    pass


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error"}


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=type or ERROR_TYPES.get(status, "server_error"),
                                             param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def create_app(config: ServeConfig, served: ServedModel | None = None) -> FastAPI:
    """The app for one model. Loads the model unless `served` is given (bad input -> OchatError)."""
    served = served or ServedModel(config)
    engine, tokenizer = served.engine, served.tokenizer
    metrics = ServerMetrics(served.name, engine.stats)
    log = app_logger(config.log_file)
    keys = [k.encode() for k in config.api_keys]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task = None if config.disable_log_stats else asyncio.create_task(_log_stats())
        yield
        if stats_task:
            stats_task.cancel()
        engine.shutdown()           # aborts whatever is still running (after uvicorn's graceful wait)

    app = FastAPI(title="ochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.metrics = metrics

    async def _log_stats() -> None:
        last_gen, last_t = 0.0, time.monotonic()
        while True:
            await asyncio.sleep(config.stats_interval_s)
            gen = metrics.generation_tokens._value.get()
            now = time.monotonic()
            stats = engine.stats()
            if gen != last_gen or stats["running"] or stats["waiting"]:
                log.info("stats", extra={"event": "stats", **stats,
                                         "generation_tokens_per_s": round((gen - last_gen) / (now - last_t), 1)})
            last_gen, last_t = gen, now

    # -- errors: one place ------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.status)
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        metrics.error(400)
        return error_response(400, str(e), param=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        metrics.error(500)
        return error_response(500, "internal server error (see the server log)", "server_error")

    # -- API keys (constant-time comparison; /health and the web page are open) ----------------------
    class _ApiKeyAuth:
        """Pure ASGI (not BaseHTTPMiddleware, which would sit between streaming responses and disconnects)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and keys and scope["method"] != "OPTIONS":
                path = scope["path"]
                if not (path in OPEN_PATHS or path == "/" or path.startswith("/ui/")):
                    header = dict(scope["headers"]).get(b"authorization", b"")
                    token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
                    ok = False
                    for k in keys:      # compare with every key: the time does not reveal which one matched
                        ok |= hmac.compare_digest(token, k)
                    if not ok:
                        metrics.error(401)
                        response = error_response(401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                                  code="invalid_api_key")
                        await response(scope, receive, send)
                        return
            await self.app(scope, receive, send)

    app.add_middleware(_ApiKeyAuth)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    # -- routes -------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.can_accept(0):
            raise APIError(503, "the engine is not running", code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        card = P.ModelCard(id=served.name, ochat=served.card_info())
        return P.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, P.ChatCompletionRequest)
        _check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        try:
            conv = conversation_from_openai([m.model_dump() for m in req.messages])
        except OchatError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt_ids = served.encoder.encode_one(conv, inference=True, condition=req.condition)[0]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _sampling_params(req, len(prompt_ids), logprobs, "messages")
        return await _serve(request, req, [prompt_ids], params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, P.CompletionRequest)
        _check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: expected a string or a non-empty list of strings", param="prompt")
        all_ids = [served.raw_prompt_ids(p) for p in prompts]
        longest = max(all_ids, key=len)
        params = _sampling_params(req, len(longest), req.logprobs, "prompt")
        return await _serve(request, req, all_ids, params, chat=False, prompts=prompts)

    # -- request handling ---------------------------------------------------------------------------
    async def _parse(request: Request, model: type[Req]) -> Req:
        size = int(request.headers.get("content-length") or 0)
        if size > config.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {config.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {config.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the JSON body must be an object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"{loc}: {err['msg']}", param=loc or None) from None

    def _check_model(name: str) -> None:
        if name not in served.names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")

    def _sampling_params(req: P.ChatCompletionRequest | P.CompletionRequest, prompt_len: int,
                         logprobs: int | None, prompt_field: str) -> SamplingParams:
        context = served.max_model_len
        if prompt_len >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your "
                                f"{prompt_field} resulted in {prompt_len} tokens.", param=prompt_field,
                           code="context_length_exceeded")
        if req.n > config.max_n:
            raise APIError(400, f"n: at most {config.max_n} choices per request (got {req.n})", param="n")
        max_tokens = req.requested_max_tokens()
        if max_tokens is not None and max_tokens > served.max_tokens_limit:
            raise APIError(400, f"max_tokens: at most {served.max_tokens_limit} (got {max_tokens})", param="max_tokens")
        if max_tokens is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_field}, {max_tokens} "
                                f"in the completion).", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(served.max_tokens_limit, context - prompt_len)
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p,
                              top_k=max(req.top_k or 0, 0), seed=req.seed, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logprobs=logprobs, ignore_eos=req.ignore_eos)

    def _stop_strings(req) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, "stop: at most 16 stop strings", param="stop")
        return [s for s in stop if s]

    async def _serve(request: Request, req, prompts_ids: list[list[int]], params: SamplingParams, chat: bool,
                     prompts: list[str] | None = None):
        n_total = len(prompts_ids) * req.n
        if not engine.can_accept(0):
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if not engine.can_accept(n_total):
            raise APIError(429, "The server is busy (request queue full); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"})
        stop = _stop_strings(req)
        request_id = P.random_id("chatcmpl" if chat else "cmpl")
        streams = []
        for p, ids in enumerate(prompts_ids):
            for i in range(req.n):
                choice_params = SamplingParams(**{**params.__dict__, "stop_token_ids": list(params.stop_token_ids)})
                if req.seed is not None:
                    choice_params.seed = req.seed + i      # n choices differ, yet each is reproducible
                streams.append(generate_choice(engine, tokenizer, p * req.n + i, ids, choice_params, stop,
                                               f"{request_id}-{p * req.n + i}"))
        prompt_tokens = sum(len(ids) for ids in prompts_ids)
        metrics.prompt_tokens.inc(prompt_tokens)
        started = time.monotonic()
        record = {"event": "request", "id": request_id, "model": req.model, "n": req.n, "stream": req.stream,
                  "prompt_tokens": prompt_tokens, "max_tokens": params.max_tokens, "user": req.user}
        if req.stream:
            return StreamingResponse(_stream(req, request_id, merge_choices(streams), chat, prompt_tokens,
                                             started, record),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        task = asyncio.ensure_future(_collect(merge_choices(streams), n_total, started))
        choices = await _until_disconnect(request, task, record)
        if isinstance(choices, Response):
            return choices
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
        if any(c["finish_reason"] == "abort" for c in choices):
            raise APIError(503, "the server is shutting down or the engine failed; retry", code="aborted")
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
        _finish_record(record, started, completion_tokens, [c["finish_reason"] for c in choices])
        if chat:
            return P.ChatCompletionResponse(id=request_id, model=req.model, usage=usage, choices=[
                P.ChatChoice(index=c["index"], message=P.ChatResponseMessage(content=c["text"]),
                             finish_reason=c["finish_reason"],
                             logprobs=_chat_logprobs(c["logprobs"]) if req.logprobs else None)
                for c in choices]).model_dump()
        return P.CompletionResponse(id=request_id, model=req.model, usage=usage, choices=[
            P.CompletionChoice(index=c["index"], finish_reason=c["finish_reason"],
                               text=(prompts[c["index"] // req.n] if req.echo else "") + c["text"],
                               logprobs=_completion_logprobs(c["logprobs"]) if req.logprobs is not None else None)
            for c in choices]).model_dump()

    async def _collect(stream: AsyncIterator[ChoiceDelta], n: int, started: float) -> list[dict[str, Any]]:
        choices = [{"index": i, "text": "", "token_ids": [], "logprobs": [], "finish_reason": None} for i in range(n)]
        first = True
        async with aclosing(stream) as deltas:
            async for d in deltas:
                if first and d.token_ids:
                    metrics.ttft.observe(time.monotonic() - started)
                    first = False
                c = choices[d.index]
                c["text"] += d.text
                c["token_ids"] += d.token_ids
                c["logprobs"] += d.logprobs
                metrics.generation_tokens.inc(len(d.token_ids))
                if d.finish_reason:
                    c["finish_reason"] = d.finish_reason
        return choices

    async def _until_disconnect(request: Request, task: asyncio.Future, record: dict) -> Any:
        """Await `task`, cancelling it (and so aborting its engine requests) if the client goes away."""
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            try:
                return task.result()
            except QueueFullError:
                raise APIError(429, "The server is busy (request queue full); retry shortly", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            except EngineDeadError as e:
                raise APIError(503, str(e), code="engine_dead") from None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _finish_record(record, time.monotonic(), 0, ["client_disconnected"])
        metrics.finished("abort")
        return Response(status_code=499)

    async def _stream(req, request_id: str, stream: AsyncIterator[ChoiceDelta], chat: bool, prompt_tokens: int,
                      started: float, record: dict) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens = 0
        reasons: list[str] = []
        first = True
        finished_normally = False

        created = int(time.time())
        object_name = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], usage: P.UsageInfo | None = None) -> str:
            # Plain dicts, not pydantic, on this per-token path. ASCII-escaped JSON: model text may hold
            # U+2028 or U+0085, which some SSE clients take for line breaks.
            chunk = {"id": request_id, "object": object_name, "created": created, "model": req.model,
                     "choices": choices}
            if usage is not None:
                chunk["usage"] = usage.model_dump()
            elif include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        # The per-token event (one text delta, no logprobs), formatted around a pre-rendered envelope:
        # the same JSON as event([choice(i, text)]) at a fraction of the cost.
        head = event([])[:-len("]}\n\n")] if not include_usage else event([])[:-len('], "usage": null}\n\n')]
        tail = "]}\n\n" if not include_usage else '], "usage": null}\n\n'
        delta_format = ('{"index": %d, "delta": {"content": %s}, "logprobs": null, "finish_reason": null}' if chat
                        else '{"index": %d, "text": %s, "logprobs": null, "finish_reason": null}')

        def text_event(index: int, text: str) -> str:
            return head + delta_format % (index, json.dumps(text)) + tail

        def choice(index: int, text: str | None, role: bool = False, finish: str | None = None,
                   logprobs: list | None = None) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                lp = _chat_logprobs(logprobs).model_dump() if logprobs is not None else None
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            lp = _completion_logprobs(logprobs).model_dump() if logprobs is not None else None
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

        try:
            if chat:
                yield event([choice(i, None, role=True) for i in range(req.n)])
            elif req.echo:
                prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
                yield event([choice(p * req.n + i, prompts[p]) for p in range(len(prompts)) for i in range(req.n)])
            async with aclosing(stream) as deltas:
                async for d in deltas:
                    if first and d.token_ids:
                        metrics.ttft.observe(time.monotonic() - started)
                        first = False
                    completion_tokens += len(d.token_ids)
                    metrics.generation_tokens.inc(len(d.token_ids))
                    want_lp = (req.logprobs if chat else req.logprobs is not None) and d.logprobs
                    if d.finish_reason == "abort":
                        raise EngineDeadError("the server is shutting down or the engine failed; retry")
                    if want_lp:
                        yield event([choice(d.index, d.text, logprobs=d.logprobs)])
                    elif d.text:
                        yield text_event(d.index, d.text)
                    if d.finish_reason:
                        reasons.append(d.finish_reason)
                        yield event([choice(d.index, None if chat else "", finish=d.finish_reason)])
            if include_usage:
                yield event([], P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                            total_tokens=prompt_tokens + completion_tokens))
            yield "data: [DONE]\n\n"
            finished_normally = True
        except (QueueFullError, EngineDeadError) as e:
            status = 429 if isinstance(e, QueueFullError) else 503
            metrics.error(status)
            err = {"error": {"message": str(e), "type": ERROR_TYPES[status], "param": None,
                             "code": "queue_full" if status == 429 else "aborted"}}
            yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
            reasons = [f"error_{status}"]
        finally:
            # Also reached when the client disconnects (the stream is cancelled): `aclosing` has
            # already aborted the engine requests and freed their slots.
            if not finished_normally and not reasons:
                reasons = ["client_disconnected"]
                metrics.finished("abort")
            _finish_record(record, started, completion_tokens, reasons)

    def _finish_record(record: dict, started: float, completion_tokens: int, reasons: list[str]) -> None:
        latency = time.monotonic() - started
        for r in reasons:
            if r in ("stop", "length"):
                metrics.finished(r)
        if all(r in ("stop", "length") for r in reasons):
            metrics.e2e.observe(latency)
        if not config.disable_log_requests:
            log.info("request", extra={**record, "completion_tokens": completion_tokens,
                                       "finish_reasons": reasons, "latency_s": round(latency, 4)})

    def _token_text(token_id: int) -> str:
        return _token_texts.get(token_id) or _token_texts.setdefault(token_id, _decode_token(token_id))

    _token_texts: dict[int, str] = {}

    def _decode_token(token_id: int) -> str:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if served.model_type.family == "sentencepiece" and isinstance(piece, str) and not piece.startswith("<0x"):
            return piece.replace("\u2581", " ")
        return tokenizer.decode([token_id])

    def _chat_logprobs(items: list[tuple[int, TokenLogprob]]) -> P.ChatLogprobs:
        content = []
        for tok, lp in items:
            text = _token_text(tok)
            content.append(P.ChatLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=[
                P.TopLogprob(token=_token_text(t), logprob=v, bytes=list(_token_text(t).encode())) for t, v in lp.top]))
        return P.ChatLogprobs(content=content)

    def _completion_logprobs(items: list[tuple[int, TokenLogprob]]) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs(top_logprobs=[])
        offset = 0
        for tok, lp in items:
            text = _token_text(tok)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({_token_text(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    try:
        from ochat.ui.web import mount_web_ui
    except ImportError:
        mount_web_ui = None
    if mount_web_ui is not None:
        mount_web_ui(app)
    return app
