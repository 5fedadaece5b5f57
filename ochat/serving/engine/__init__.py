"""The narrow interface between the HTTP layer and a generation engine.

An engine takes prompt token ids and per-request `SamplingParams` and streams `EngineOutput`s
(the tokens generated since the previous output) until one has `finish_reason` set. The HTTP layer
owns everything textual (templates, detokenization, stop strings); engines only see token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


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


async def next_output(outputs) -> EngineOutput:
    """The next output of one request; a consumer that fell behind gets everything queued as one output:
    under load the HTTP layer then detokenizes and sends once per wake-up instead of once per token."""
    out = await outputs.get()
    while out.finish_reason is None and not outputs.empty():
        nxt = outputs.get_nowait()
        logprobs = (out.logprobs or []) + (nxt.logprobs or []) if (out.logprobs or nxt.logprobs) else None
        out = EngineOutput(out.token_ids + nxt.token_ids, logprobs, nxt.finish_reason,
                           out.prompt_logprobs or nxt.prompt_logprobs, nxt.error)
    return out


class QueueFullError(Exception):
    """The bounded waiting queue is full: the client should retry later (HTTP 429)."""


class EngineDeadError(Exception):
    """The engine stopped (shutdown or crash): HTTP 503."""


class Engine(Protocol):
    max_model_len: int

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def can_accept(self, n: int) -> bool: ...        # room in the waiting queue for n more requests

    def stats(self) -> dict[str, int]: ...          # {"running": .., "waiting": ..}

    def shutdown(self) -> None: ...


def pick_engine(name: str) -> str:
    """`auto` -> vllm when vllm is installed and a CUDA GPU is present, else transformers."""
    if name != "auto":
        return name
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"
