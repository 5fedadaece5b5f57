"""Read the conversations to visualize: `PREFIX.*.text.jsonl` from the data pipeline, or any
conversation JSONL / JSON list (canonical `items` or ShareGPT `conversations`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ochat.errors import OchatError
from ochat.templates import Conversation, parse_conversation

ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class Record:
    id: str
    text: str                                # shown in the map (the decoded text when the pipeline gave one)
    conversation: Conversation | None        # the structured form, when known

    @property
    def embedding_text(self) -> str:
        """What gets embedded: role-labelled plain text, without template tokens like <s> or
        <|end_of_turn|>, which would only spend the embedder's short token budget."""
        return conversation_text(self.conversation) if self.conversation is not None else self.text


def conversation_text(conv: Conversation) -> str:
    parts = [f"System: {conv.system}"] if conv.system else []
    parts += [f"{ROLE_LABELS[m.role]}: {m.content}" for m in conv.items]
    return "\n\n".join(parts)


def conversation_json(conv: Conversation) -> dict[str, Any]:
    return {"items": [{"role": m.role, "content": m.content, "weight": m.weight} for m in conv.items],
            "condition": conv.condition, "system": conv.system}


def _record(obj: Any, where: str, index: int) -> Record:
    if isinstance(obj, str):                 # the v1 `--legacy-json` text file is a list of strings
        return Record(id=str(index), text=obj, conversation=None)
    if not isinstance(obj, dict):
        raise OchatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", obj.get("question_id", index)))
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise OchatError(f"{where}: field 'text': expected a string, got {type(obj['text']).__name__}")
        conv = obj.get("conversation")
        conv = parse_conversation(conv, f"{where} field 'conversation'") if conv is not None else None
        return Record(id=rid, text=obj["text"], conversation=conv)
    if "items" in obj or "conversations" in obj:
        conv = parse_conversation(obj, where)
        return Record(id=rid, text=conversation_text(conv), conversation=conv)
    raise OchatError(f"{where}: expected a field 'text' (a .text.jsonl line) or 'items'/'conversations' "
                     f"(a conversation); got fields {sorted(obj)[:8]}")


def read_records(path: str | Path) -> list[Record]:
    """One record per conversation; a one-line OchatError names the file and line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise OchatError(f"{path}: no such file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    records: list[Record] = []
    if raw.lstrip().startswith("["):         # a JSON list (FastChat / ShareGPT dumps, v1 text.json)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise OchatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        records = [_record(obj, f"{path} item {i}", i) for i, obj in enumerate(data)]
    else:
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise OchatError(f"{path} line {lineno}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            records.append(_record(obj, f"{path} line {lineno}", len(records)))
    if not records:
        raise OchatError(f"{path}: no conversations found (empty file?)")
    return records
