"""From engine token streams to text: incremental detokenization, stop strings, n choices.

Text deltas never split a UTF-8 character: a token that ends inside a multi-byte character (a
SentencePiece byte-fallback token such as <0xE2>) decodes to U+FFFD, so the text is held back until the
character is complete. With stop strings, the last `len(longest stop) - 1` characters are held back
too, because they may be the start of a stop string that the next token completes.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from transformers import PreTrainedTokenizerBase

from ochat.serving.engine import Engine, RequestFailedError, SamplingParams, TokenLogprob


class IncrementalDetokenizer:
    """Decode a growing list of ids, returning only the new complete text each time.

    Decodes a short window (`prefix_offset:`) rather than everything so far: SentencePiece drops the
    leading space of the first token of a decode, which the window's earlier tokens account for."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._backend = _rust_decoder(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: int | list[int]) -> str:
        """Append one or more ids; return the text they complete ("" while a character is unfinished)."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""


def _rust_decoder(tokenizer: PreTrainedTokenizerBase):
    """The `tokenizers` object behind a fast tokenizer whose decode adds nothing to it (with
    clean_up_tokenization_spaces=False), so the per-token path skips transformers' Python wrapper."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode:
        return tokenizer._tokenizer
    return None


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[tuple[int, TokenLogprob]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None     # first delta only, when requested


async def generate_choice(engine: Engine, tokenizer: PreTrainedTokenizerBase, index: int, prompt_ids: list[int],
                          params: SamplingParams, stop: list[str], request_id: str) -> AsyncIterator[ChoiceDelta]:
    """Stream one choice as text deltas; the last delta has `finish_reason` ("stop" | "length" | "abort").
    A request the engine failed alone raises RequestFailedError."""
    detok = IncrementalDetokenizer(tokenizer)
    text = ""            # all text decoded so far (after truncation at a stop string)
    sent = 0             # characters of `text` already yielded
    hold = max((len(s) for s in stop), default=1) - 1
    async with aclosing(engine.generate(prompt_ids, params, request_id)) as outputs:
        async for out in outputs:
            finish = out.finish_reason
            if finish == "error":
                raise RequestFailedError(out.error or "the engine failed this request", out.error_status, out.error_param)
            new_ids = list(out.token_ids)
            if finish == "stop" and new_ids and new_ids[-1] in params.stop_token_ids:
                ids_for_text = new_ids[:-1]          # the end-of-turn token is not text
            else:
                ids_for_text = new_ids
            if ids_for_text:
                text += detok.add(ids_for_text)
            if stop and finish != "abort":
                # Search only where a new match can start: the held-back tail plus the new text.
                start = max(0, sent - hold)
                hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
                if hits:
                    text, finish = text[:min(hits)], "stop"
            end = len(text) if finish else max(sent, len(text) - hold)
            delta = ChoiceDelta(index, text[sent:end], new_ids,
                                list(zip(new_ids, out.logprobs)) if out.logprobs else [], finish,
                                out.prompt_logprobs)
            sent = end
            yield delta
            if finish:
                return          # leaving the engine's generator early aborts the request (stop string)


def merge_choices(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Interleave n choice streams as their deltas arrive; cancel the others if one fails. One stream is
    returned as it is (no generator in between to pass each delta through)."""
    return streams[0] if len(streams) == 1 else _merged(streams)


async def _merged(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async with aclosing(stream) as s:
                async for d in s:
                    await queue.put(d)
            await queue.put(done)
        except BaseException as e:  # forwarded to the consumer
            await queue.put(e)
            raise

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
