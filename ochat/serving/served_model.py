"""The model a server serves: its directory, model type, tokenizer, template encoder and engine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ochat.errors import OchatError
from ochat.serving.engine import Engine, pick_engine
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import ModelType

if TYPE_CHECKING:
    from ochat.models.model_dir import ModelDir


@dataclass
class ServeConfig:
    """Every option of `ochat serve` (the CLI, the seed-era module and `start_server` build one)."""

    model: str
    model_type: str = "auto"
    served_model_name: str | None = None
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = 18888
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    log_file: str | None = None
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    stats_interval_s: float = 10.0
    max_num_seqs: int = 64
    max_queue: int = 1024
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_tokens_limit: int | None = None       # default: the context length
    shutdown_timeout_s: float = 10.0
    engine_process: bool = True               # transformers engine in its own process (else a thread of this one)
    engine_standby: bool = False              # a spare engine process (~250 MiB) for a fast restart after a crash
    # vLLM engine options (vLLM's own names and meanings; None = vLLM's default)
    gpu_memory_utilization: float | None = None   # share of GPU memory for weights + KV cache (vLLM: 0.9)
    kv_cache_memory_bytes: int | None = None      # KV cache size in bytes, instead of the share (CPU: the KV cache)
    quantization: str | None = None               # e.g. awq, gptq, fp8, compressed-tensors
    enable_prefix_caching: bool | None = None     # reuse the KV cache of shared prompt prefixes
    max_num_batched_tokens: int | None = None     # most tokens per engine step (prefill chunk size)
    enforce_eager: bool | None = None             # no CUDA graphs / torch.compile: faster start, slower steps
    engine_args: list[str] = field(default_factory=list)  # any other vLLM engine argument, as KEY=VALUE


class ServedModel:
    def __init__(self, config: ServeConfig):
        from ochat.models.model_dir import ModelDir

        model_dir = ModelDir(config.model, "--model", config.model_type)
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
        self.names = {self.name, self.model_type.name, *self.model_type.aliases, self.model_dir.name, config.model,
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
                           stop_token_ids=stop_ids)
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
