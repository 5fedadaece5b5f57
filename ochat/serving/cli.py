"""`ochat serve`: the OpenAI-compatible server (the command the OpenChat model cards tell people to run)."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from ochat.serving.served_model import ServeConfig


def serve(
    model: str = typer.Option(..., "--model", help="Model directory (Hugging Face format; ochat.json gives the type)."),
    model_type: str = typer.Option("auto", "--model-type", help="Conversation template; auto = from ochat.json."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name clients use (default: the model type)."),
    engine: str = typer.Option("auto", "--engine", help="auto (vllm where installed and usable, GPU or CPU), transformers or vllm."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 to accept remote clients)."),
    port: int = typer.Option(18888, "--port"),
    api_keys: Optional[List[str]] = typer.Option(None, "--api-keys", help="Accepted Bearer keys (repeat the flag or separate with commas)."),
    cors_origins: Optional[List[str]] = typer.Option(None, "--cors-origins", help="Origins allowed by CORS, e.g. '*'."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Write JSON-lines logs here (rotated at 20 MB)."),
    disable_log_requests: bool = typer.Option(False, "--disable-log-requests", help="Do not log each request."),
    disable_log_stats: bool = typer.Option(False, "--disable-log-stats", help="Do not log throughput every 10 s."),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", min=1, help="Most requests in the running batch."),
    max_queue: int = typer.Option(1024, "--max-queue", min=0, help="Most requests waiting; beyond it: HTTP 429."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=16, help="Context length (default: the model type's)."),
    max_n: int = typer.Option(16, "--max-n", min=1, help="Most choices (n) per request."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", min=1, help="Most tokens one request may ask for (default: the context)."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes", min=1024, help="Largest request body."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1, help="GPUs per model (vllm engine)."),
    engine_standby: bool = typer.Option(False, "--engine-standby", help="Keep a spare engine process (~250 MiB): after a crash the engine is back in about a second instead of a fresh start (transformers engine)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX, else float32), float32, bfloat16 or float16."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help="vllm: share of GPU memory for weights + KV cache."),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, "--kv-cache-memory-bytes", help="vllm: KV cache size in bytes (instead of the share; on CPU: the KV cache)."),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="vllm: awq, gptq, fp8, compressed-tensors, ..."),
    enable_prefix_caching: Optional[bool] = typer.Option(None, "--enable-prefix-caching/--no-enable-prefix-caching", help="vllm: reuse the KV cache of shared prefixes."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", min=1, help="vllm: most tokens per engine step."),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--no-enforce-eager", help="vllm: no CUDA graphs / compilation (faster start)."),
    engine_args: Optional[List[str]] = typer.Option(None, "--engine-arg", help="vllm: any engine argument as KEY=VALUE (repeat the flag)."),
) -> None:
    """Serve a model with an OpenAI-compatible API (and the web chat at /)."""
    split = lambda values: [v.strip() for item in values or [] for v in item.split(",") if v.strip()]  # noqa: E731
    config = ServeConfig(model=model, model_type=model_type, served_model_name=served_model_name, engine=engine,
                         host=host, port=port, api_keys=split(api_keys), cors_origins=split(cors_origins),
                         log_file=log_file, disable_log_requests=disable_log_requests,
                         disable_log_stats=disable_log_stats, max_num_seqs=max_num_seqs, max_queue=max_queue,
                         max_model_len=max_model_len, max_n=max_n, max_tokens_limit=max_tokens_limit,
                         max_body_bytes=max_body_bytes, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                         gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
                         quantization=quantization, enable_prefix_caching=enable_prefix_caching,
                         max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
                         engine_args=list(engine_args or []), engine_standby=engine_standby)
    run_server(config)


def run_server(config: ServeConfig) -> None:
    """Load the model, serve until SIGINT/SIGTERM (running requests get `shutdown_timeout_s` to finish)."""
    import uvicorn

    from ochat.serving.api_server import create_app
    from ochat.serving.logs import log_to_stderr

    log_to_stderr()
    app = create_app(config)
    served = app.state.served
    print(f"ochat: serving {served.model_dir} ({served.model_type.name}, {served.engine_name} engine, "
          f"{getattr(served.engine, 'dtype', config.dtype)}) as "
          f"'{served.name}' at http://{config.host}:{config.port}/v1"
          + (" (API keys required)" if config.api_keys else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=int(config.shutdown_timeout_s))
