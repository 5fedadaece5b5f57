"""POST /v1/chat/completions (vLLM's `serving_chat.py`): messages -> the model's template -> choices,
answered in full or streamed as `chat.completion.chunk` events."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ochat.errors import OchatError
from ochat.serving import protocol as P
from ochat.serving.errors import APIError
from ochat.serving.generation import ChoiceDelta
from ochat.serving.served_model import ServedModel
from ochat.serving.serving_engine import Generation, OpenAIServing, chat_logprobs, off_loop_if_large
from ochat.serving.validation import CHAT_UNSUPPORTED, parse_request
from ochat.templates.conversation import conversation_from_openai


def chat_prompt_ids(served: ServedModel, messages: list[P.ChatMessage], condition: str | None) -> list[int]:
    """The token ids the model's template makes of `messages` (400 for messages it cannot render)."""
    try:
        conv = conversation_from_openai([m.model_dump() for m in messages])
    except OchatError as e:
        raise APIError(400, str(e), param="messages") from None
    return served.encoder.encode_one(conv, inference=True, condition=condition)[0]


def messages_size(messages: list[P.ChatMessage]) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
               for m in messages)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: Request) -> Response | dict:
        req = await parse_request(request, P.ChatCompletionRequest, self.config, CHAT_UNSUPPORTED)
        served = self.models.resolve(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        self.check_capacity(req, 1, "messages")
        prompt_ids = await off_loop_if_large(messages_size(req.messages), chat_prompt_ids, served, req.messages,
                                             req.condition)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(served, req, len(prompt_ids), logprobs, "messages")
        gen = self.start(served, req, [prompt_ids], params, "chatcmpl")
        if req.stream:
            return StreamingResponse(self.chat_completion_stream_generator(gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.chat_completion_full_generator(request, gen)

    async def chat_completion_full_generator(self, request: Request, gen: Generation) -> Response | dict:
        choices = await self.collect_until_disconnect(request, gen)
        if isinstance(choices, Response):
            return choices
        usage = self.usage(gen, choices)
        self.finish_record(gen, usage.completion_tokens, [c.finish_reason for c in choices])
        return P.ChatCompletionResponse(id=gen.request_id, created=gen.created, model=gen.req.model, usage=usage,
                                        choices=[
            P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                         logprobs=chat_logprobs(gen.served, c.logprobs) if gen.req.logprobs else None)
            for c in choices]).model_dump()

    def chat_completion_stream_generator(self, gen: Generation):
        req = gen.req

        def chunk(choices: list[P.ChatChunkChoice]) -> str:
            return gen.chunk(P.ChatCompletionChunk, choices)

        def choice(index: int, delta: P.DeltaMessage, logprobs=None, finish: str | None = None) -> P.ChatChunkChoice:
            return P.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)

        def render(d: ChoiceDelta) -> list[str]:
            events = []
            if req.logprobs and d.logprobs:
                events.append(chunk([choice(d.index, P.DeltaMessage(content=d.text),
                                            chat_logprobs(gen.served, d.logprobs))]))
            elif d.text:
                index = d.index
                events.append(gen.text_event(index, d.text, lambda text: gen.chunk_model(
                    P.ChatCompletionChunk, [choice(index, P.DeltaMessage(content=text))])))
            if d.finish_reason:
                events.append(chunk([choice(d.index, P.DeltaMessage(), finish=d.finish_reason)]))
            return events

        opening = [chunk([choice(i, P.DeltaMessage(role="assistant", content="")) for i in range(req.n)])]
        return self.stream_events(gen, P.ChatCompletionChunk, opening, render)
