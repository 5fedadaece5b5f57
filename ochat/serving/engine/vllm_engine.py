"""The vLLM engine (GPU): vLLM's `AsyncLLM` behind ochat's engine interface.

Chosen automatically when vllm is installed and a CUDA GPU is present. `--tensor-parallel-size N`
shards the model over N GPUs; for several nodes start a Ray cluster first (`ray start --head` /
`ray start --address ...`): with more GPUs requested than one node has, vLLM uses its Ray backend.
vllm is imported only when this engine is built, so this module imports on any machine.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ochat.errors import OchatError
from ochat.serving.engine import EngineDeadError, EngineOutput, QueueFullError, SamplingParams, TokenLogprob


class VLLMEngine:
    def __init__(self, model_dir: str, max_model_len: int | None = None, max_num_seqs: int = 256, max_queue: int = 1024,
                 dtype: str = "auto", tensor_parallel_size: int = 1, stop_token_ids: list[int] | None = None):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise OchatError(f"--engine vllm: vllm is not installed or failed to import ({e}); "
                             f"pip install vllm, or use --engine transformers") from None
        import torch

        if not torch.cuda.is_available():
            raise OchatError("--engine vllm needs a CUDA GPU; use --engine transformers on CPU")
        backend = "ray" if tensor_parallel_size > torch.cuda.device_count() else None
        args = AsyncEngineArgs(model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=max_model_len,
                               max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size,
                               distributed_executor_backend=backend, disable_log_stats=True)
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = self.engine.model_config.max_model_len
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.default_stop_ids = list(stop_token_ids or [])
        self._in_flight: set[str] = set()
        self._stopped = False

    def stats(self) -> dict[str, int]:
        n = len(self._in_flight)
        return {"running": min(n, self.max_num_seqs), "waiting": max(0, n - self.max_num_seqs)}

    def can_accept(self, n: int) -> bool:
        return not self._stopped and len(self._in_flight) + n <= self.max_num_seqs + self.max_queue

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]:
        from vllm import SamplingParams as VSamplingParams

        if self._stopped:
            raise EngineDeadError("the engine is shutting down")
        if not self.can_accept(1):
            raise QueueFullError(f"{len(self._in_flight)} requests in flight")
        stop_ids = list(dict.fromkeys(params.stop_token_ids + self.default_stop_ids))
        sp = VSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k if params.top_k > 0 else -1, seed=params.seed,
                             presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                             logprobs=params.logprobs, stop_token_ids=stop_ids, ignore_eos=params.ignore_eos, skip_special_tokens=True,
                             detokenize=False)
        self._in_flight.add(request_id)
        sent = 0
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, sp, request_id):
                comp = out.outputs[0]
                new = list(comp.token_ids[sent:])
                logprobs = None
                if params.logprobs is not None and comp.logprobs:
                    logprobs = []
                    for tok, table in zip(new, comp.logprobs[sent:]):
                        top = sorted(((t, lp.logprob) for t, lp in table.items()), key=lambda x: -x[1])
                        logprobs.append(TokenLogprob(table[tok].logprob, top[: params.logprobs]))
                sent = len(comp.token_ids)
                finish = None
                if out.finished:
                    finish = "length" if comp.finish_reason == "length" else ("stop" if comp.finish_reason == "stop" else "abort")
                yield EngineOutput(new, logprobs, finish)
                if out.finished:
                    return
        finally:
            self._in_flight.discard(request_id)

    def abort(self, request_id: str) -> None:
        # Closing the generator already aborts inside vLLM; this covers requests aborted from elsewhere.
        try:
            asyncio.get_running_loop().create_task(self.engine.abort(request_id))
        except RuntimeError:
            pass

    def shutdown(self) -> None:
        self._stopped = True
        self.engine.shutdown()
