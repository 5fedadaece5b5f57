"""POST /v1/completions (vLLM's `serving_completion.py`): raw prompts (the client applied any template)
-> choices, answered in full or streamed as `text_completion` events."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ochat.serving import protocol as P
from ochat.serving.errors import APIError
from ochat.serving.generation import ChoiceDelta
from ochat.serving.serving_engine import Generation, OpenAIServing, completion_logprobs, parse_request


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: Request) -> Response | dict:
        req = await parse_request(request, P.CompletionRequest, self.config.max_body_bytes)
        served = self.models.resolve(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: expected a string or a non-empty list of strings", param="prompt")
        all_ids = [served.raw_prompt_ids(p) for p in prompts]
        params = self.sampling_params(served, req, max(len(ids) for ids in all_ids), req.logprobs, "prompt")
        gen = self.start(served, req, all_ids, params, "cmpl")
        if req.stream:
            return StreamingResponse(self.completion_stream_generator(gen, prompts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.completion_full_generator(request, gen, prompts)

    async def completion_full_generator(self, request: Request, gen: Generation, prompts: list[str]) -> Response | dict:
        choices = await self.collect_until_disconnect(request, gen)
        if isinstance(choices, Response):
            return choices
        req = gen.req
        usage = self.usage(gen, choices)
        self.finish_record(gen, usage.completion_tokens, [c.finish_reason for c in choices])
        return P.CompletionResponse(id=gen.request_id, created=gen.created, model=req.model, usage=usage, choices=[
            P.CompletionChoice(index=c.index, finish_reason=c.finish_reason,
                               text=(prompts[c.index // req.n] if req.echo else "") + c.text,
                               logprobs=completion_logprobs(gen.served, c.logprobs) if req.logprobs is not None
                               else None)
            for c in choices]).model_dump()

    def completion_stream_generator(self, gen: Generation, prompts: list[str]):
        req = gen.req

        def chunk(choices: list[P.CompletionChoice]) -> str:
            return gen.chunk(P.CompletionChunk, choices)

        def choice(index: int, text: str, logprobs=None, finish: str | None = None) -> P.CompletionChoice:
            return P.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)

        def render(d: ChoiceDelta) -> list[str]:
            events = []
            if req.logprobs is not None and d.logprobs:
                events.append(chunk([choice(d.index, d.text, completion_logprobs(gen.served, d.logprobs))]))
            elif d.text:
                events.append(chunk([choice(d.index, d.text)]))
            if d.finish_reason:
                events.append(chunk([choice(d.index, "", finish=d.finish_reason)]))
            return events

        opening = []
        if req.echo:
            opening.append(chunk([choice(p * req.n + i, prompts[p]) for p in range(len(prompts))
                                  for i in range(req.n)]))
        return self.stream_events(gen, P.CompletionChunk, opening, render)
