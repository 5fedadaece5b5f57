"""The canonical conversation schema that every part of ochat reads and writes.

    {"items": [{"role": "user"|"assistant", "content": str, "weight": float|null}],
     "condition": str, "system": str}

ShareGPT's `{"conversations"|"items": [{"from": "human"|"gpt", "value": ...}]}` is accepted on input.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ochat.errors import OchatError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "assistant": "assistant", "system": "system"}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str
    weight: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_sharegpt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "role" not in data and "from" in data:
            role = SHAREGPT_ROLES.get(str(data["from"]).lower(), data["from"])
            data = {"role": role, "content": data.get("value"), "weight": data.get("weight")}
        return data


class Conversation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[Message]
    condition: str = ""
    system: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_sharegpt(cls, data: Any) -> Any:
        if isinstance(data, dict) and "items" not in data and "conversations" in data:
            data = {**data, "items": data["conversations"]}
        if isinstance(data, dict):
            # A ShareGPT dump may carry its system prompt as a first message.
            items = data.get("items")
            if isinstance(items, list) and items and isinstance(items[0], dict):
                first_role = items[0].get("role", items[0].get("from"))
                if first_role == "system":
                    data = {**data, "system": items[0].get("content", items[0].get("value")) or "",
                            "items": items[1:]}
            if data.get("system") is None:
                data = {**data, "system": ""}
            if data.get("condition") is None:
                data = {**data, "condition": ""}
        return data


def conversation_from_openai(messages: list[dict[str, Any]], condition: str = "") -> Conversation:
    """Convert OpenAI chat `messages` (system first or anywhere; content str or text parts)."""
    system_parts: list[str] = []
    items: list[Message] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OchatError(f"messages[{i}].content: expected a string or a list of text parts")
        if role in ("system", "developer"):
            system_parts.append(content)
        elif role in ("user", "assistant"):
            items.append(Message(role=role, content=content))
        else:
            raise OchatError(f"messages[{i}].role: expected 'system', 'user' or 'assistant', got {role!r}")
    return Conversation(items=items, condition=condition, system="\n".join(system_parts))


def parse_conversation(obj: Any, where: str = "input") -> Conversation:
    """Validate one conversation (canonical or ShareGPT) with a one-line error naming `where`."""
    try:
        return Conversation.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise OchatError(f"{where}: field '{loc}': {err['msg']}") from None
