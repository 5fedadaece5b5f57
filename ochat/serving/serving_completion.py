"""POST /v1/completions (vLLM's `serving_completion.py`): raw prompts (the client applied any template)
or token ids -> choices, answered in full or streamed as `text_completion` events.

Scoring as vLLM does it: `echo` with `logprobs` returns the prompt tokens' log-probabilities too (null
for the first), and `max_tokens: 0` with `echo` scores the prompt without generating."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ochat.serving import protocol as P
from ochat.serving.errors import APIError
from ochat.serving.generation import ChoiceDelta
from ochat.serving.served_model import ServedModel
from ochat.serving.serving_engine import (Choice, Generation, OpenAIServing, completion_logprobs,
                                          off_loop_if_large)
from ochat.serving.validation import parse_request


def prompt_ids(served: ServedModel, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized (special tokens parsed, BOS added), ids are checked."""
    vocab = len(served.tokenizer)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(served.raw_prompt_ids(p))
            continue
        bad = next((t for t in p if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is not in the vocabulary (0..{vocab - 1})",
                           param="prompt" if len(prompts) == 1 else f"prompt.{i}")
        out.append(list(p))
    return out


def _prompt_size(prompts: list[str] | list[list[int]]) -> int:
    return sum(len(p) for p in prompts)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: Request) -> Response | dict:
        req = await parse_request(request, P.CompletionRequest, self.config)
        served = self.models.resolve(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 only with echo (to score the prompt)", param="max_tokens")
        prompts = req.prompt_list()
        self.check_capacity(req, len(prompts), "prompt")
        all_ids = await off_loop_if_large(_prompt_size(prompts), prompt_ids, served, prompts)
        params = self.sampling_params(served, req, max(len(ids) for ids in all_ids), req.logprobs, "prompt")
        if req.echo and req.logprobs is not None:
            params.prompt_logprobs = req.logprobs
        gen = self.start(served, req, all_ids, params, "cmpl")
        texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in prompts] if req.echo else None
        if req.stream:
            return StreamingResponse(self.completion_stream_generator(gen, texts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.completion_full_generator(request, gen, texts)

    def _logprobs(self, gen: Generation, c: Choice | ChoiceDelta, echoed: bool, offset: int) -> P.CompletionLogprobs:
        """The choice's (or delta's) logprobs; `echoed`: the prompt's tokens come first."""
        items = list(c.logprobs)
        if echoed:
            prompt = gen.prompt_ids_of(c.index)
            items = list(zip(prompt, c.prompt_logprobs or [None] * len(prompt))) + items
        return completion_logprobs(gen.served, items, offset)

    async def completion_full_generator(self, request: Request, gen: Generation,
                                        texts: list[str] | None) -> Response | dict:
        choices = await self.collect_until_disconnect(request, gen)
        if isinstance(choices, Response):
            return choices
        req = gen.req
        usage = self.usage(gen, choices)
        self.finish_record(gen, usage.completion_tokens, [c.finish_reason for c in choices])
        return P.CompletionResponse(id=gen.request_id, created=gen.created, model=req.model, usage=usage, choices=[
            P.CompletionChoice(index=c.index, finish_reason=c.finish_reason,
                               text=(texts[c.index // req.n] if texts else "") + c.text,
                               logprobs=self._logprobs(gen, c, bool(texts), 0) if req.logprobs is not None else None)
            for c in choices]).model_dump()

    def completion_stream_generator(self, gen: Generation, texts: list[str] | None):
        req = gen.req
        offsets = [0] * gen.n_choices      # text_offset of each choice's next token
        echoed: set[int] = set()

        def chunk(choices: list[P.CompletionChoice]) -> str:
            return gen.chunk(P.CompletionChunk, choices)

        def choice(index: int, text: str, logprobs=None, finish: str | None = None) -> P.CompletionChoice:
            return P.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)

        def render(d: ChoiceDelta) -> list[str]:
            events = []
            echo = texts is not None and d.index not in echoed       # the prompt goes with the first delta
            echoed.add(d.index)
            text = (texts[d.index // req.n] if echo else "") + d.text
            if req.logprobs is not None and (d.logprobs or echo):
                lp = self._logprobs(gen, d, echo, offsets[d.index])
                offsets[d.index] += sum(len(t) for t in lp.tokens)
                events.append(chunk([choice(d.index, text, lp)]))
            elif text:
                index = d.index
                events.append(gen.text_event(index, text, lambda t: gen.chunk_model(P.CompletionChunk,
                                                                                    [choice(index, t)])))
            if d.finish_reason:
                events.append(chunk([choice(d.index, "", finish=d.finish_reason)]))
            return events

        return self.stream_events(gen, P.CompletionChunk, [], render)
