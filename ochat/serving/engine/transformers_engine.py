"""Continuous batching over a Hugging Face causal LM (CPU or one GPU), in vLLM V1's layout.

`EngineCore` holds the model and the scheduler state and does one thing: `step()`. No thread, no asyncio.
Every step it
  1. admits waiting requests while fewer than `max_num_seqs` run: short prompts are prefilled together
     as one left-padded batch, a long prompt is prefilled `prefill_chunk` tokens per step, so a long
     prompt never stalls the running requests for more than one chunk;
  2. merges the freshly prefilled rows into the running batch's KV cache (left padding + mask);
  3. runs one decode forward for the whole running batch and samples with each row's own parameters;
  4. drops finished or aborted rows (and the KV columns no row needs any more)
and returns the new tokens of every request as `(request_id, EngineOutput)` pairs. Requests thus join and
leave the batch at token granularity. KV memory is bounded by `max_num_seqs x max_model_len`.

Two thin clients drive a core: `TransformersEngine` (below: a thread of this process) and `ProcessEngine`
(process_engine.py: a child process over a pipe, what `ochat serve` uses).

Isolation: a request's parameters and prompt are checked when it is added (its own "error" output if they
are unusable); a failure while sampling one row fails that row alone; a failed prefill of a group is retried
one request at a time; a failed decode forward (e.g. out of memory) drops the batch cache and recomputes the
running requests from their tokens (vLLM's preemption by recomputation), failing a request only when it was
part of two failed steps.

Why not transformers' own `generate_batch` / `ContinuousBatchingManager`: measured on this 2-core CPU
with the tiny model (32 prompts x 64 tokens) it gave 89 tokens/s against 80 for one `generate` at a
time: its paged-attention bookkeeping costs more than the batching wins on CPU, and it has no
per-request sampling parameters. This engine gets far more (see BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ochat.serving.engine import (EngineDeadError, EngineOutput, QueueFullError, SamplingParams, TokenLogprob,
                                  deliver_outputs, fail_streams, stream_outputs)
from ochat.serving.engine.fast_decode import RowKVCache, decode_hidden, fuse_projections, supports_fast_decode
from ochat.serving.engine.packed_linear import pack_linears
from ochat.serving.engine.sampling import checked_params, sample

log = logging.getLogger("ochat.serving")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_STEP_FAILURES = 2           # a request part of this many failed steps fails (it may be the cause)
SMALL_MODEL = 100_000_000       # parameters: below it a CPU step is per-call overhead more than arithmetic


def cpu_has_bf16_units() -> bool:
    """Native bf16 matrix instructions (AMX or AVX512-BF16): bf16 matmuls run at least as fast as fp32 ones."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it and on CPUs with bf16 units, fp32 on other CPUs, else fp16."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@dataclass
class _Seq:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)   # what its prefill computes (prompt [+ generated])
    prefilled: int = 0                       # tokens of `context` already in `cache` (chunked prefill)
    cache: DynamicCache | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # gathered during prefill, sent with the 1st output
    finish_reason: str | None = None
    step_failures: int = 0

    @property
    def length(self) -> int:                 # tokens in the KV cache once the last sampled token is fed
        return len(self.prompt_ids) + len(self.generated)


class EngineCore:
    """The model and the scheduler: `add_request`, `abort_request`, `step()` (see the module docstring)."""

    def __init__(self, model_dir: str, max_model_len: int | None = None, max_num_seqs: int = 64,
                 dtype: str = "auto", device: str | None = None, prefill_chunk: int = 512,
                 prefill_budget: int = 2048, stop_token_ids: list[int] | None = None, cpu_threads: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.dtype = str(torch_dtype).removeprefix("torch.")
        config = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.device.type == "cpu":
            # Small models: the intra-op thread pool's synchronisation costs more than the tiny matmuls
            # gain (measured: a 64x256 linear takes 20 us on one thread, 1.3 ms on two of a busy VM).
            # Larger models: every core this process may use, whatever OMP_NUM_THREADS says (it is often 1 for
            # a server's other libraries; vLLM sets its CPU worker's threads itself too; `--cpu-threads` decides
            # otherwise). Measured on the 2-core VM, 243M model, 32 rows: 48 ms per decode step on two threads
            # against 80 on one.
            torch.set_num_threads(cpu_threads or (1 if n_params < SMALL_MODEL else len(os.sched_getaffinity(0))))
        self.threads = torch.get_num_threads()
        log.info("transformers engine: %s, %.1fM parameters, %s on %s (%d threads)", model_dir, n_params / 1e6,
                 self.dtype, self.device, self.threads)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        head = self.model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0]
        self.input_vocab_size = self.model.get_input_embeddings().num_embeddings
        # Plain LM heads on CPU: multiply by a pre-transposed copy of the weight ourselves. The decode step's
        # biggest op is this [rows, hidden] x [hidden, vocab] product; in torch's [vocab, hidden] layout MKL
        # repacks the whole weight on every call (measured: 2.8 vs 3.4 ms for 32 rows of the tiny model).
        self._head_t: torch.Tensor | None = None
        if (self.device.type == "cpu" and config.model_type in ("llama", "mistral", "qwen2")
                and head.weight.dtype == torch.float32 and getattr(head, "bias", None) is None):
            self._head_t = head.weight.detach().t().contiguous()
        # The Llama family decodes through fast_decode.py (a KV cache written in place); others through HF's forward.
        self._fast = supports_fast_decode(self.model)
        # Small models on CPU, whose step is per-call overhead: the decode step fuses projections (copies made
        # before packing drops the weights) and keeps K/V in float32 (fast_decode.py says why).
        small_cpu = self._fast and self.device.type == "cpu" and n_params < SMALL_MODEL
        self._fused = fuse_projections(self.model) if small_cpu else None
        self._kv_dtype = torch.float32 if small_cpu else None
        if self.device.type == "cpu" and torch_dtype == torch.bfloat16:
            packed = pack_linears(self.model) + (pack_linears(self._fused) if self._fused is not None else 0)
            log.info("transformers engine: %d linear layers prepacked for oneDNN", packed)
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes away).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        self.default_stop_ids = [int(t) for t in stop_token_ids or []]

        self._waiting: list[_Seq] = []
        self._prefilling: list[_Seq] = []                          # long prompts, chunk by chunk
        self._running: list[_Seq] = []                             # rows of the batch cache, in order
        self._cache: DynamicCache | RowKVCache | None = None       # the running batch's K/V
        self._mask: torch.Tensor | None = None                    # HF path: [rows, kv columns], 1 = real token
        self._next_tokens: list[int] = []                          # the token each row feeds next
        self._outputs: list[tuple[str, EngineOutput]] = []         # returned by the next step()

    # -- the interface the clients use ----------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._outputs)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; unusable parameters or prompt become its own "error" output at the next step."""
        try:
            params = checked_params(params, self.vocab_size, self.default_stop_ids)
            prompt = self._checked_prompt(prompt_ids)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed)
        except Exception as e:  # whatever is wrong with it, it is this request's own error
            self._emit_error(request_id, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
            return
        seq = _Seq(request_id, prompt, params, generator, context=list(prompt))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self._waiting.append(seq)

    def _checked_prompt(self, prompt_ids: list[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if not all(0 <= t < self.input_vocab_size for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.input_vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{self.input_vocab_size - 1})")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than the context ({self.max_model_len})")
        return prompt

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is (no output: its client has gone)."""
        self._waiting = [s for s in self._waiting if s.request_id != request_id]
        self._prefilling = [s for s in self._prefilling if s.request_id != request_id]
        keep = [i for i, s in enumerate(self._running) if s.request_id != request_id]
        if len(keep) != len(self._running):
            self._keep_rows(keep)

    def abort_all(self) -> list[tuple[str, EngineOutput]]:
        """Finish every request with "abort" (shutdown); returns their last outputs."""
        for seq in self._waiting + self._prefilling + self._running:
            self._emit(seq, EngineOutput([], finish_reason="abort"))
        self._waiting, self._prefilling = [], []
        self._keep_rows([])
        out, self._outputs = self._outputs, []
        return out

    def step(self) -> list[tuple[str, EngineOutput]]:
        """Prefill what fits, decode the running batch once; the new outputs of every request."""
        with torch.inference_mode():
            budget = self.prefill_budget
            # Long prompts already being prefilled: one chunk each (at most one per step beyond the budget).
            for seq in list(self._prefilling):
                budget -= self._guarded_chunk(seq)
                if budget <= 0:
                    break
            group = self._admit(budget)
            if group:
                self._prefill_isolated(group)
            if self._running:
                self._guarded_decode()
        out, self._outputs = self._outputs, []
        return out

    # -- scheduling and isolation -----------------------------------------------------------------------
    def _admit(self, budget: int) -> list[_Seq]:
        """Waiting requests that fit: long ones start chunked prefill now, short ones form one group."""
        group: list[_Seq] = []
        while self._waiting and budget > 0 and self.num_running + len(group) < self.max_num_seqs:
            seq = self._waiting[0]
            n = len(seq.context)
            if n > self.prefill_chunk:
                self._prefilling.append(self._waiting.pop(0))
                budget -= self._guarded_chunk(seq)
                continue
            longest = max([n] + [len(s.context) for s in group])
            if group and longest * (len(group) + 1) > budget:
                break
            if group and (seq.prompt_logprobs is None) != (group[0].prompt_logprobs is None):
                break       # scoring computes logits at every position: only for groups that all need them
            group.append(self._waiting.pop(0))
        return group

    def _fail(self, seq: _Seq, error: BaseException | str) -> None:
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        log.warning("request %s failed in the engine: %s", seq.request_id, message)
        seq.finish_reason = "error"
        self._emit_error(seq.request_id, message)

    def _emit_error(self, request_id: str, message: str) -> None:
        self._outputs.append((request_id, EngineOutput([], finish_reason="error", error=message)))

    def _guarded_chunk(self, seq: _Seq) -> int:
        try:
            return self._prefill_chunk_of(seq)
        except Exception as e:  # its own cache: only this request is affected
            if seq in self._prefilling:
                self._prefilling.remove(seq)
            seq.cache = None
            self._fail(seq, e)
            return 0

    def _prefill_isolated(self, group: list[_Seq]) -> None:
        """Prefill the group together; if that fails, each request alone, so one bad request fails alone."""
        try:
            self._prefill_group(group)
            return
        except Exception as e:
            if len(group) == 1:
                self._fail(group[0], e)
                return
            log.warning("prefill of %d requests failed (%s); retrying them one by one", len(group), e)
        for seq in group:
            if seq.finish_reason is None:
                try:
                    self._prefill_group([seq])
                except Exception as e:
                    self._fail(seq, e)

    def _guarded_decode(self) -> None:
        try:
            self._decode()
        except Exception as e:  # the batch cache may be half-updated
            self._recompute(self._running, e)

    def _recompute(self, seqs: list[_Seq], error: Exception) -> None:
        """Drop the batch cache; `seqs` (the running ones and any that were joining) wait to be prefilled again
        from their tokens, first in line, unless they were part of too many failed steps."""
        log.warning("a step of %d requests failed (%s); recomputing them", len(seqs), error)
        self._running, self._next_tokens, self._cache, self._mask = [], [], None, None
        requeue = []
        for seq in seqs:
            seq.step_failures += 1
            if seq.step_failures >= MAX_STEP_FAILURES:
                self._fail(seq, error)
            else:
                seq.context, seq.prefilled = seq.prompt_ids + seq.generated, 0
                requeue.append(seq)
        self._waiting[:0] = requeue

    # -- model steps ------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, all_positions: bool = False) -> torch.Tensor:
        """Float32 logits [rows, positions, vocab] of the last position, or of all of them."""
        if self._head_t is not None:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                           use_cache=True, **{self._cache_kw: cache}).last_hidden_state
            return (hidden if all_positions else hidden[:, -1:, :]) @ self._head_t
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True,
                         logits_to_keep=0 if all_positions else 1, **{self._cache_kw: cache})
        return out.logits.float()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states [rows, hidden]."""
        if self._head_t is not None:
            return hidden @ self._head_t
        return self.model.get_output_embeddings()(hidden).float()

    def _prefill_group(self, group: list[_Seq]) -> None:
        """Prefill short prompts together (left-padded), sample their first tokens, join the batch."""
        width = max(len(s.context) for s in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, s in enumerate(group):
            n = len(s.context)
            ids[i, width - n:] = torch.tensor(s.context)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        scoring = any(s.prompt_logprobs is not None for s in group)
        logits = self._forward(ids, mask, positions, cache, all_positions=scoring)
        scored = {i: _prompt_logprobs(logits[i, width - len(s.context):width - 1], s.context[1:], s.params.prompt_logprobs)
                  for i, s in enumerate(group) if s.prompt_logprobs is not None}
        for i, entries in scored.items():       # only once all succeeded: a failed group is retried
            group[i].prompt_logprobs += entries
        self._join(group, cache, mask, logits[:, -1])

    def _prefill_chunk_of(self, seq: _Seq) -> int:
        """One chunk of a long prompt; when the prompt is done, sample and join the batch."""
        if seq.cache is None:
            seq.cache = DynamicCache(config=self.model.config)
        n = len(seq.context)
        start, end = seq.prefilled, min(seq.prefilled + self.prefill_chunk, n)
        ids = torch.tensor([seq.context[start:end]])
        mask = torch.ones((1, end), dtype=torch.long)
        scoring = seq.prompt_logprobs is not None
        logits = self._forward(ids, mask, torch.arange(start, end)[None], seq.cache, all_positions=scoring)
        if scoring:     # position p scores token p + 1: the chunks together score tokens 1 .. n - 1
            last = min(end, n - 1)
            seq.prompt_logprobs += _prompt_logprobs(logits[0, : last - start], seq.context[start + 1:last + 1],
                                                    seq.params.prompt_logprobs)
        seq.prefilled = end
        if end == n:
            self._prefilling.remove(seq)
            cache, seq.cache = seq.cache, None
            self._join([seq], cache, mask, logits[:, -1])
        return end - start

    def _join(self, seqs: list[_Seq], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        for seq in seqs:
            if seq.params.max_tokens == 0:          # scoring only: the prompt's logprobs, no token
                seq.finish_reason = "length"
                self._emit(seq, EngineOutput([], finish_reason="length"))
        todo = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        self._sample_and_emit([seqs[i] for i in todo], logits[todo] if len(todo) != len(seqs) else logits)
        live = [i for i in todo if seqs[i].finish_reason is None]
        if not live:
            return
        try:
            self._merge([seqs[i] for i in live], live if len(live) != len(seqs) else None, cache, mask)
        except Exception as e:  # tokens were sent already: not a retry of the prefill, a recomputation
            self._recompute(self._running + [seqs[i] for i in live if seqs[i] not in self._running], e)

    def _merge(self, seqs: list[_Seq], rows: list[int] | None, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled sequences (rows `rows` of `cache`, or all) to the running batch."""
        if self._fast:
            if self._cache is None or not self._running:
                self._cache = RowKVCache(self.model, self.max_model_len, self._kv_dtype)
            self._cache.add(cache, rows or list(range(len(seqs))), [len(s.context) for s in seqs])
            self._running += seqs
            self._next_tokens += [s.generated[-1] for s in seqs]
            return
        if rows is not None:
            idx = torch.tensor(rows, device=self.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            mask = mask[torch.tensor(rows)]
        if self._cache is None or not self._running:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._running += seqs
        self._next_tokens += [s.generated[-1] for s in seqs]

    def _decode(self) -> None:
        rows = len(self._running)
        if self._fast:
            ids = torch.tensor(self._next_tokens, device=self.device)
            positions = torch.tensor([s.length - 1 for s in self._running], device=self.device)
            logits = self._logits(decode_hidden(self.model, self._cache, ids, positions, self._fused))
        else:
            ids = torch.tensor(self._next_tokens)[:, None]
            positions = torch.tensor([s.length - 1 for s in self._running])[:, None]
            mask = torch.cat([self._mask, torch.ones((rows, 1), dtype=self._mask.dtype)], dim=1)
            logits = self._forward(ids, mask, positions, self._cache)[:, -1]
            self._mask = mask
        self._sample_and_emit(self._running, logits)
        self._next_tokens = [s.generated[-1] for s in self._running]
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) != rows:
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` of the batch, dropping the KV columns that no remaining row attends to
        (left padding of departed rows)."""
        if not keep:
            self._running, self._next_tokens, self._cache, self._mask = [], [], None, None
            return
        if self._fast:
            order = self._cache.keep(keep)
            self._running = [self._running[i] for i in order]
            self._next_tokens = [self._next_tokens[i] for i in order]
            return
        idx = torch.tensor(keep)
        self._running = [self._running[i] for i in keep]
        self._next_tokens = [self._next_tokens[i] for i in keep]
        mask = self._mask[idx]
        first = int(mask.any(dim=0).long().argmax())
        dev_idx = idx.to(self.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys[dev_idx, :, first:]
            layer.values = layer.values[dev_idx, :, first:]
        self._mask = mask[:, first:]

    # -- sampling ---------------------------------------------------------------------------------------
    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int | None]:
        """Sample one token per sequence and emit it; a sequence whose sampling fails fails alone (None)."""
        logits = logits[:, : self.vocab_size]
        try:
            tokens, logprobs = sample(seqs, logits)
        except Exception:
            tokens, logprobs = [], []
            for i, seq in enumerate(seqs):
                try:
                    tok, lp = sample([seq], logits[i:i + 1])
                    tokens.append(tok[0])
                    logprobs.append(lp[0] if lp else None)
                except Exception as e:
                    self._fail(seq, e)
                    tokens.append(None)
                    logprobs.append(None)
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            if tok is None:
                continue
            seq.generated.append(tok)
            if tok in seq.params.stop_token_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.params.max_tokens or seq.length >= self.max_model_len:
                seq.finish_reason = "length"
            self._emit(seq, EngineOutput([tok], [logprobs[i]] if logprobs and logprobs[i] else None,
                                         seq.finish_reason))
        return tokens

    def _emit(self, seq: _Seq, out: EngineOutput) -> None:
        if seq.prompt_logprobs is not None:         # the first output carries them
            out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        self._outputs.append((seq.request_id, out))


def _prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """logits[j] scores targets[j]: each target's log-probability and the k best (a few ops for the whole
    prompt, not a few per token: on a GPU each would be a synchronisation)."""
    if not targets:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(lp, []) for lp in chosen]
    values, ids = logp.topk(k, dim=-1)
    return [TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


def _left_pad(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


class TransformersEngine:
    """The in-process client: an `EngineCore` stepped by a background thread of this process."""

    def __init__(self, model_dir: str, max_queue: int = 1024, **core_options):
        self.core = EngineCore(model_dir, **core_options)
        self.max_model_len = self.core.max_model_len
        self.dtype = self.core.dtype
        self.max_queue = max_queue
        self.state = "ready"
        self.restarts = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()      # ("add", id, ids, params) | ("abort", id)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="ochat-engine", daemon=True)
        self._thread.start()

    # -- the Engine interface (event-loop side) ---------------------------------------------------
    def stats(self) -> dict[str, int]:
        running = self.core.num_running
        return {"running": running, "waiting": max(0, len(self._streams) - running)}

    def can_accept(self, n: int) -> bool:
        return not self._stopped and self.stats()["waiting"] + n <= self.max_queue

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]:
        if self._stopped:
            raise EngineDeadError("the engine is shutting down")
        waiting = self.stats()["waiting"]
        if waiting >= self.max_queue:
            raise QueueFullError(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", request_id, list(prompt_ids), params))
        self._wake.set()
        async for out in stream_outputs(outputs, self._streams, request_id, self.abort):
            yield out

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.core.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.core.step())
            self._deliver(self.core.abort_all())
        except BaseException as e:  # a bug in the core: nobody is left waiting for an answer
            log.exception("the engine thread stopped")
            self._stopped = True
            fail_streams(self._streams, EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self.core.add_request(*msg[1:])
            else:
                self.core.abort_request(msg[1])

    def _deliver(self, outputs: list[tuple[str, EngineOutput]]) -> None:
        deliver_outputs(self._streams, outputs)