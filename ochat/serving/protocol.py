"""Request and response bodies of the OpenAI-compatible API (pydantic models, no serving logic)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# What the engine can really do, checked at the edge (400 naming the field) rather than in the engine.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1        # any 64-bit seed (signed or not), as vLLM and torch take
MAX_TOP_K = 2**31 - 1                           # clipped to the vocabulary by the engine
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024                          # characters: stop strings are held back while they may match
MAX_MESSAGES = 4096
MAX_PROMPTS = 4096


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send vendor extras); the
    # ones that would change what the answer must be are refused first (serving_engine.UNSUPPORTED).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


StopStrings = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]


class _SamplingFields(_Request):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="-1 or 0: off (vLLM's extension)")
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings | list[StopStrings] | None = Field(None, description=f"at most {MAX_STOP_STRINGS} strings")
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False          # vLLM's extension: do not stop at the end-of-turn token


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str = ""


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    condition: str | None = None                       # C-RLFT condition, e.g. "GPT4 Correct", "Code"
    max_completion_tokens: int | None = Field(None, ge=1)
    max_generated_tokens: int | None = Field(None, ge=1)  # the seed-era name
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_generated_tokens


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class CompletionRequest(_SamplingFields):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        """One clear message for the four shapes (pydantic would list every union member's error)."""
        def token_ids(x: Any) -> bool:
            return (isinstance(x, list) and len(x) > 0
                    and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in x))

        if isinstance(v, str) or token_ids(v):
            return v
        if isinstance(v, list) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request (got {len(v)})")
        if isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or all(token_ids(x) for x in v)):
            return v
        raise ValueError("expected a string, a non-empty list of strings, a list of token ids (integers >= 0) "
                         "or a list of such lists")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]


class TokenizeCompletionRequest(_Request):
    """POST /tokenize with a raw prompt (vLLM's shape)."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """POST /tokenize with messages: the prompt the chat template makes of them (vLLM's shape)."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    condition: str | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; the first has no logprob (null)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionChunk(CompletionResponse):
    """One event of a streaming completion (OpenAI sends the same object type as the full response)."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ochat"
    ochat: dict[str, Any]                  # model_type, conditions, default_condition, max_context


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = "ok"
    down: list[str] | None = None      # "degraded" (several models): the ones whose engine cannot answer now


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
