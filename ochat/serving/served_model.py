"""The model a server serves: its directory, model type, tokenizer, template encoder and engine."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ochat.errors import OchatError
from ochat.serving.engine import Engine, pick_engine
from ochat.serving.multi_model import ModelSpec, model_specs
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import ModelType
from ochat.utils.config_cli import arg

if TYPE_CHECKING:
    from ochat.models.model_dir import ModelDir

VLLM = "vLLM engine"
RAY = "Ray Serve (the optional extra 'ray' of ochat)"


@dataclass
class ServeConfig:
    """Serve a model with an OpenAI-compatible API (and the web chat at /).

    The one definition of `ochat serve`'s options: the CLI (ochat/serving/cli.py), the seed-era module
    (ochat/compat/serving.py) and `start_server` are all built from these fields."""

    model: list[str] = arg(help="Model directory (Hugging Face format; ochat.json gives the type) or LoRA adapter "
                                "directory; repeat as DIR:name=NAME to serve several models behind one endpoint.")
    model_type: str = arg("auto", help="Conversation template; auto = from ochat.json.")
    served_model_name: str | None = arg(None, help="Name clients use (default: the model type).")
    engine: Literal["auto", "transformers", "vllm"] = arg(
        "auto", help="auto (vllm where installed and usable, GPU or CPU), transformers or vllm.")
    host: str = arg("127.0.0.1", help="Interface to bind (0.0.0.0 to accept remote clients; then set --api-keys).")
    port: int = arg(18888, min=0, max=65535, help="Port to listen on.")
    api_keys: list[str] = arg(default_factory=list, split=",",
                              help="Accepted Bearer keys (repeat the flag or separate with commas).")
    cors_origins: list[str] = arg(default_factory=list, split=",", help="Origins allowed by CORS, e.g. '*'.")
    allowed_hosts: list[str] = arg(default_factory=list, split=",",
                                   help="Host names accepted without API keys besides loopback names, IP addresses "
                                        "and --host ('*': any; the DNS-rebinding check is then off).")
    log_file: str | None = arg(None, help="Write JSON-lines logs here (rotated at 20 MB).")
    disable_log_requests: bool = arg(False, flag="--disable-log-requests", help="Do not log each request.")
    disable_log_stats: bool = arg(False, flag="--disable-log-stats", help="Do not log throughput periodically.")
    stats_interval_s: float = arg(10.0, min=0.1, help="Seconds between throughput log lines.")
    max_num_seqs: int = arg(64, min=1, help="Most requests in the running batch.")
    max_queue: int = arg(1024, min=0, help="Most requests waiting; beyond it: HTTP 429.")
    max_model_len: int | None = arg(None, min=16, help="Context length (default: the model type's).")
    tensor_parallel_size: int = arg(1, min=1, help="GPUs per model (vllm engine).")
    dtype: str = arg("auto", help="auto (bfloat16 on GPUs and on CPUs with AVX512-BF16/AMX, else float32), "
                                  "float32, bfloat16 or float16.")
    max_body_bytes: int = arg(4 * 1024 * 1024, min=1024, help="Largest request body.")
    max_n: int = arg(16, min=1, help="Most choices (n) per request.")
    max_tokens_limit: int | None = arg(None, min=1, help="Most tokens one request may ask for (default: the context).")
    max_connections: int = arg(1024, min=1, help="Most open connections; beyond it new ones get 503.")
    header_timeout_s: float = arg(10.0, min=0.1, help="Seconds a client may take to send a request's headers.")
    body_timeout_s: float = arg(30.0, min=0.1, help="Seconds a client may take to send a request's body.")
    request_timeout_s: float | None = arg(None, min=0.1,
                                          help="Most seconds one request may run (default: no limit); then 504.")
    shutdown_timeout_s: float = arg(10.0, min=0, help="Seconds running requests get to finish on SIGTERM.")
    cpu_threads: int | None = arg(None, min=1, help="Intra-op threads of the transformers engine on CPU (default: 1 "
                                                   "below 100M parameters, else every core the process may use).")
    engine_process: bool = arg(True, help="Run the transformers engine in its own process (else a thread).")
    engine_standby: bool = arg(False, help="Keep a spare engine process (~250 MiB): after a crash the engine is back "
                                           "in about a second instead of a fresh start (transformers engine).")
    # vLLM engine options (vLLM's own names and meanings; None = vLLM's default)
    gpu_memory_utilization: float | None = arg(None, panel=VLLM, help="vllm: share of GPU memory for weights + KV "
                                                                      "cache (vLLM: 0.9).")
    kv_cache_memory_bytes: int | None = arg(None, panel=VLLM, help="vllm: KV cache size in bytes (instead of the "
                                                                   "share; on CPU: the KV cache).")
    quantization: str | None = arg(None, panel=VLLM, help="vllm: awq, gptq, fp8, compressed-tensors, ...")
    enable_prefix_caching: bool | None = arg(None, panel=VLLM, help="vllm: reuse the KV cache of shared prefixes.")
    max_num_batched_tokens: int | None = arg(None, min=1, panel=VLLM, help="vllm: most tokens per engine step.")
    enforce_eager: bool | None = arg(None, panel=VLLM, help="vllm: no CUDA graphs / compilation (faster start).")
    engine_args: list[str] = arg(default_factory=list, names=("--engine-arg",), panel=VLLM,
                                 help="vllm: any engine argument as KEY=VALUE (repeat the flag).")
    votes_file: str | None = arg(None, help="Append the web chat's compare-view votes here (JSON lines; "
                                            "`ochat eval ranking` reads it).")
    # Ray Serve (ochat/serving/ray_app.py): replicas that each hold the whole app
    ray: bool = arg(False, flag="--ray", panel=RAY, help="Serve on Ray Serve replicas, each with its own engine(s).")
    ray_address: str | None = arg(None, panel=RAY, help="Join this Ray cluster (default: start a local Ray instance).")
    replicas: int | None = arg(None, min=1, panel=RAY, help="Fixed number of replicas (default 1).")
    min_replicas: int | None = arg(None, min=0, panel=RAY, help="Autoscale on queue length from this many replicas...")
    max_replicas: int | None = arg(None, min=1, panel=RAY, help="... up to this many.")
    target_ongoing_requests: int | None = arg(None, min=1, panel=RAY, help="Autoscaling target of running + queued "
                                                                          "requests per replica (default: --max-num-seqs).")
    ray_cpus_per_replica: float = arg(1.0, min=0, panel=RAY, help="CPUs Ray reserves for each replica.")

    def __post_init__(self):
        if isinstance(self.model, str):       # Python callers: ServeConfig(model="DIR")
            self.model = [self.model]


class ServedModel:
    def __init__(self, config: ServeConfig, spec: ModelSpec | None = None):
        """The model of `spec` (one `--model` value; default: the only one) with the server's options.
        A LoRA adapter directory is a model too (its ochat.json and tokenizer; the engine adds the base)."""
        from ochat.models.model_dir import ModelDir

        spec = spec or model_specs(config.model, config.served_model_name)[0]
        config = replace(config, model=[spec.path], served_model_name=spec.name,
                         model_type=spec.model_type or config.model_type, engine=spec.engine or config.engine)
        self.spec = spec
        model_dir = ModelDir(spec.path, "--model", config.model_type, allow_lora_adapter=True)
        self.engine_name = pick_engine(config.engine)
        self._engine_process = None
        if self.engine_name == "transformers":
            from ochat.serving.engine.vllm_engine import vllm_options

            if options := vllm_options(config):
                raise OchatError(f"--{next(iter(options)).replace('_', '-')}: a vLLM engine option, but the engine "
                                 f"is transformers (give --engine vllm, with vLLM installed)")
        if self.engine_name == "transformers" and config.engine_process:
            from ochat.serving.engine.process_engine import EngineProcess

            self._engine_process = EngineProcess()      # starts importing torch while we load the tokenizer
        try:
            self._load(config, model_dir)
        except BaseException:
            if self._engine_process is not None:
                self._engine_process.kill()
            raise

    def _load(self, config: ServeConfig, model_dir: "ModelDir") -> None:
        self.model_type: ModelType = model_dir.model_type
        self.model_dir = model_dir.path
        self.tokenizer = model_dir.tokenizer
        self.encoder = ConversationEncoder(self.model_type, self.tokenizer)
        self.name = config.served_model_name or self.model_type.name
        self.names = {self.name, self.model_type.name, *self.model_type.aliases, self.model_dir.name, self.spec.path,
                      str(self.model_dir.resolve())}
        self.engine: Engine = self._build_engine(config)
        self.max_model_len = min(self.engine.max_model_len, self.model_type.max_context)
        self.max_tokens_limit = config.max_tokens_limit or self.max_model_len
        self._token_texts: dict[int, str] = {}

    def _build_engine(self, config: ServeConfig) -> Engine:
        stop_ids = list(dict.fromkeys(self.encoder.eot_ids))
        if self.engine_name == "transformers":
            options = dict(max_model_len=config.max_model_len or self.model_type.max_context,
                           max_num_seqs=config.max_num_seqs, max_queue=config.max_queue, dtype=config.dtype,
                           stop_token_ids=stop_ids, cpu_threads=config.cpu_threads)
            if config.engine_process:
                from ochat.serving.engine.process_engine import ProcessEngine

                return ProcessEngine(str(self.model_dir), process=self._engine_process,
                                     standby=config.engine_standby, **options)
            from ochat.serving.engine.transformers_engine import TransformersEngine

            return TransformersEngine(str(self.model_dir), **options)
        if self.engine_name == "vllm":
            from ochat.serving.engine.vllm_engine import VLLMEngine

            return VLLMEngine.from_config(str(self.model_dir), config, self.model_type.max_context, stop_ids)
        raise OchatError(f"--engine {config.engine}: expected auto, transformers or vllm")

    def card_info(self) -> dict:
        mt = self.model_type
        return {"model_type": mt.name, "conditions": list(mt.conditions) if mt.uses_condition else [],
                "default_condition": mt.inference_condition if mt.uses_condition else "",
                "max_context": self.max_model_len, "engine": self.engine_name,
                "model_dir": os.fspath(self.model_dir.name)}

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """A raw text prompt (template already applied by the client): special tokens are parsed."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.encoder.bos_ids and ids[:1] != self.encoder.bos_ids:
            ids = self.encoder.bos_ids + ids
        return ids

    def token_text(self, token_id: int) -> str:
        """The text of one token as logprobs show it (SentencePiece's ▁ as a space), cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if self.model_type.family == "sentencepiece" and isinstance(piece, str) and not piece.startswith("<0x"):
                text = piece.replace("\u2581", " ")
            else:
                text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text
