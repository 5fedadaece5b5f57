"""Per-request sampling for the transformers engine: parameter checks, then one batched sampler.

Every value the HTTP layer accepts is safe here too (the engine does not trust its caller): temperatures
below `GREEDY_BELOW` mean greedy (1e-300 is 0.0 in float32, and dividing by it gives inf/nan), `top_k`
beyond the vocabulary means no top-k, seeds of any size are reduced modulo 2**64 (torch's range).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch

from ochat.serving.engine import SamplingParams, TokenLogprob

GREEDY_BELOW = 1e-5         # vLLM's _SAMPLING_EPS: a smaller temperature is greedy


def checked_params(params: SamplingParams, vocab_size: int, default_stop_ids: list[int]) -> SamplingParams:
    """A sanitized copy of `params`; ValueError (the request's own error) for values no sampler can use."""
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    for name in ("max_tokens", "top_k"):
        if isinstance(getattr(params, name), bool) or not isinstance(getattr(params, name), int):
            raise ValueError(f"{name}: expected an integer, got {getattr(params, name)!r}")
    if params.max_tokens < 0:
        raise ValueError(f"max_tokens: expected >= 0, got {params.max_tokens}")
    if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
        raise ValueError(f"seed: expected an integer, got {params.seed!r}")
    return dataclasses.replace(
        params,
        temperature=0.0 if params.temperature < GREEDY_BELOW else float(params.temperature),
        top_p=min(max(float(params.top_p), 0.0), 1.0),
        top_k=params.top_k if 0 < params.top_k < vocab_size else 0,
        seed=None if params.seed is None else params.seed % 2**64,
        logprobs=_clip_k(params.logprobs, "logprobs", vocab_size),
        prompt_logprobs=_clip_k(params.prompt_logprobs, "prompt_logprobs", vocab_size),
        stop_token_ids=list(dict.fromkeys([int(t) for t in params.stop_token_ids] + default_stop_ids)))


def _clip_k(k: int | None, name: str, vocab_size: int) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{name}: expected None or an integer >= 0, got {k!r}")
    return min(k, vocab_size)


class Row(Protocol):
    """What the sampler needs of one sequence."""
    params: SamplingParams
    generated: list[int]
    generator: torch.Generator | None


def sample(rows: list[Row], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None] | None]:
    """One token per row (logits: [rows, vocab], float32; not modified) and, where asked, its logprobs."""
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        logits = _penalised(rows, logits)
    if logits.device.type == "cpu":
        # numpy's argmax is vectorised, torch's CPU argmax is not: 0.4 vs 4 ms for 32 x 32001 logits, a
        # third of a decode step of a small model. Both return the first maximum.
        tokens = torch.from_numpy(logits.numpy().argmax(axis=-1))
    else:
        tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if sampled:
        _sample_rows(rows, logits, sampled, tokens)
    token_list = tokens.tolist()
    if not any(r.params.logprobs is not None for r in rows):
        return token_list, None
    logp = torch.log_softmax(logits, dim=-1)
    return token_list, [None if r.params.logprobs is None else token_logprob(logp[i], token_list[i], r.params.logprobs)
                        for i, r in enumerate(rows)]


def token_logprob(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s log-probability and the `k` best (logp: one row of log-probabilities)."""
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logp.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(float(logp[token]), top)


def _penalised(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()             # the caller may sample these rows again one by one
    for i, r in enumerate(rows):
        p = r.params
        if (p.presence_penalty or p.frequency_penalty) and r.generated:
            counts = torch.bincount(torch.tensor(r.generated, device=logits.device), minlength=logits.shape[1])
            counts = counts[: logits.shape[1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if bool((logits[i].isnan() | (logits[i] == math.inf)).any()):
                raise ValueError("the penalties made the logits infinite (presence/frequency penalty too large)")
    return logits


def _sample_rows(rows: list[Row], logits: torch.Tensor, sampled: list[int], tokens: torch.Tensor) -> None:
    idx = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device, dtype=logits.dtype)
    sub = logits[idx] / temps[:, None]
    top_k = [rows[i].params.top_k for i in sampled]
    top_p = [rows[i].params.top_p for i in sampled]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sub = top_k_top_p(sub, top_k, top_p)
    probs = torch.softmax(sub, dim=-1)
    free = [j for j, i in enumerate(sampled) if rows[i].generator is None]
    if free:
        tokens[idx[free]] = torch.multinomial(probs[free], 1)[:, 0].to(tokens.dtype)
    for j, i in enumerate(sampled):
        if rows[i].generator is not None:
            tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]


def top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask all but each row's top_k (0 = all) best tokens and its top_p nucleus (the best token always stays)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    remove = torch.arange(vocab, device=logits.device)[None, :] >= ks[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs            # mass of the strictly better tokens
    remove |= before > torch.tensor(top_p, device=logits.device)[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
