"""The OpenAI-compatible HTTP API (vLLM's `entrypoints/openai/api_server.py`): `create_app` builds the
FastAPI app, its middleware and its routes; the serving modules do the work.

Routes: GET /v1/models[/{id}] (serving_models), POST /v1/chat/completions (serving_chat),
POST /v1/completions (serving_completion), POST /tokenize and /detokenize (serving_tokenization),
GET /health, GET /metrics, and the web chat at / (ochat.serving.web). Every error leaves
through ochat.serving.errors in OpenAI's shape; /openapi.json describes every body (ochat.serving.openapi)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse

from ochat.serving import protocol as P
from ochat.serving.engine import engine_state
from ochat.serving.errors import APIError, install_error_handlers
from ochat.serving.logs import app_logger
from ochat.serving.metrics import ServerMetrics
from ochat.serving.middleware import RequestGuard
from ochat.serving.multi_model import load_models
from ochat.serving.openapi import body, install_openapi, responses
from ochat.serving.served_model import ServeConfig, ServedModel
from ochat.serving.serving_chat import OpenAIServingChat
from ochat.serving.serving_completion import OpenAIServingCompletion
from ochat.serving.serving_models import ServingModels
from ochat.serving.serving_tokenization import OpenAIServingTokenization
from ochat.serving.web import mount_web_ui


async def log_stats(config: ServeConfig, models: ServingModels, metrics: ServerMetrics, log: logging.Logger) -> None:
    """Every `stats_interval_s`: throughput and queue lengths, while there is anything to report."""
    last_gen, last_t = 0.0, time.monotonic()
    while True:
        await asyncio.sleep(config.stats_interval_s)
        gen = metrics.generation_tokens._value.get()
        now = time.monotonic()
        stats = models.default.engine.stats()
        if gen != last_gen or stats["running"] or stats["waiting"]:
            log.info("stats", extra={"event": "stats", **stats,
                                     "generation_tokens_per_s": round((gen - last_gen) / (now - last_t), 1)})
        last_gen, last_t = gen, now


def create_app(config: ServeConfig, served: ServedModel | list[ServedModel] | None = None) -> FastAPI:
    """The app serving `served` (one model or several); loads every `config.model` when none is given
    (bad input -> OchatError)."""
    served_list = [served] if isinstance(served, ServedModel) else list(served or load_models(config))
    models = ServingModels(served_list)
    metrics = ServerMetrics(models.default.name, models.default.engine.stats,
                            lambda: engine_state(models.default.engine)[1])
    for s in models.served[1:]:           # every model's series under its own model_name
        metrics.add_model(s.name, s.engine.stats, lambda s=s: engine_state(s.engine)[1])
    log = app_logger(config.log_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stats_task = None if config.disable_log_stats else asyncio.create_task(log_stats(config, models, metrics, log))
        yield
        if stats_task:
            stats_task.cancel()
        for s in models.served:
            s.engine.shutdown()     # aborts whatever is still running (after uvicorn's graceful wait)

    app = FastAPI(title="ochat", summary="OpenAI-compatible API of `ochat serve`", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.served = models.default
    app.state.models = models
    app.state.metrics = metrics
    install_error_handlers(app, metrics, log)
    app.add_middleware(RequestGuard, config=config, metrics=metrics)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    serving = (models, config, metrics, log)
    add_routes(app, models, metrics, OpenAIServingChat(*serving), OpenAIServingCompletion(*serving),
               OpenAIServingTokenization(*serving))
    install_openapi(app)
    mount_web_ui(app, config)
    return app


def add_routes(app: FastAPI, models: ServingModels, metrics: ServerMetrics, chat: OpenAIServingChat,
               completion: OpenAIServingCompletion, tokenization: OpenAIServingTokenization) -> None:
    @app.get("/health", response_model=P.HealthResponse, response_model_exclude_none=True, responses=responses(503))
    async def health():
        # With several models, one dead or restarting engine leaves the server up ("degraded"): the others
        # still answer. 503 only when no model can answer.
        restarting = [s.name for s in models.served if engine_state(s.engine)[0] == "restarting"]
        down = [s.name for s in models.served if s.name in restarting or not s.engine.can_accept(0)]
        if len(down) == len(models.served) and restarting:
            raise APIError(503, "the engine process died and is restarting", code="engine_restarting",
                           headers={"Retry-After": "2"})
        if len(down) == len(models.served):
            raise APIError(503, "the engine is not running", code="engine_dead")
        return P.HealthResponse(status="degraded", down=down) if down else P.HealthResponse()

    @app.get("/metrics", response_class=PlainTextResponse, responses=responses(401, 403))
    async def metrics_route():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=P.ModelList, responses=responses(401, 403))
    async def list_models():
        return models.list()

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=responses(401, 403, 404))
    async def retrieve_model(model_id: str):
        return models.card(models.resolve(model_id))

    @app.post("/v1/chat/completions", **body(P.ChatCompletionRequest, P.ChatCompletionResponse, stream=True,
                                                    chunk_name="ChatCompletionChunk"))
    async def chat_completions(request: Request):
        return await chat.create_chat_completion(request)

    @app.post("/v1/completions", **body(P.CompletionRequest, P.CompletionResponse, stream=True,
                                               chunk_name="CompletionChunk"))
    async def completions(request: Request):
        return await completion.create_completion(request)

    @app.post("/tokenize", **body(P.TokenizeCompletionRequest | P.TokenizeChatRequest, P.TokenizeResponse))
    async def tokenize(request: Request):
        return await tokenization.create_tokenize(request)

    @app.post("/detokenize", **body(P.DetokenizeRequest, P.DetokenizeResponse))
    async def detokenize(request: Request):
        return await tokenization.create_detokenize(request)
