"""POST /tokenize and /detokenize in vLLM's shapes, so harnesses can count tokens with the server's own
tokenizer and template (`prompt` as /v1/completions tokenizes it, or `messages` as the chat template does)."""

from __future__ import annotations

from fastapi import Request

from ochat.serving import protocol as P
from ochat.serving.errors import APIError
from ochat.serving.served_model import ServedModel
from ochat.serving.serving_chat import chat_prompt_ids, messages_size
from ochat.serving.serving_engine import OpenAIServing, off_loop_if_large
from ochat.serving.validation import CHAT_UNSUPPORTED, read_json, validate


def _completion_ids(served: ServedModel, req: P.TokenizeCompletionRequest) -> list[int]:
    if req.add_special_tokens:
        return served.raw_prompt_ids(req.prompt)
    return served.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]


class OpenAIServingTokenization(OpenAIServing):
    def _model(self, name: str | None) -> ServedModel:
        return self.models.default if name is None else self.models.resolve(name)

    async def create_tokenize(self, request: Request) -> P.TokenizeResponse:
        data = await read_json(request, self.config)
        if isinstance(data, dict) and "messages" in data:
            chat = validate(P.TokenizeChatRequest, data, CHAT_UNSUPPORTED)
            served = self._model(chat.model)
            if not chat.add_generation_prompt:
                raise APIError(400, "add_generation_prompt: only true is supported (the template's prompt for a "
                                    "reply)", param="add_generation_prompt", code="unsupported_parameter")
            ids = await off_loop_if_large(messages_size(chat.messages), chat_prompt_ids, served, chat.messages,
                                          chat.condition)
            strs = chat.return_token_strs
        else:
            req = validate(P.TokenizeCompletionRequest, data)
            served = self._model(req.model)
            ids = await off_loop_if_large(len(req.prompt), _completion_ids, served, req)
            strs = req.return_token_strs
        return P.TokenizeResponse(count=len(ids), max_model_len=served.max_model_len, tokens=ids,
                                  token_strs=served.tokenizer.convert_ids_to_tokens(ids) if strs else None)

    async def create_detokenize(self, request: Request) -> P.DetokenizeResponse:
        req = validate(P.DetokenizeRequest, await read_json(request, self.config))
        served = self._model(req.model)
        vocab = len(served.tokenizer)
        bad = next((t for t in req.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is not in the vocabulary (0..{vocab - 1})", param="tokens")
        return P.DetokenizeResponse(prompt=served.tokenizer.decode(req.tokens))
