"""Records -> token ids, per-token weights and the decoded text, with the template registry.

The ids and weights are exactly `ConversationEncoder.encode` (what `ochat template encode` prints),
except for a conversation that `fit` truncated: its last answer was cut, so its end-of-turn token is
left out (as OpenChat v1's token truncation did), and anything still past the context is cut off.
"""

from __future__ import annotations

from dataclasses import dataclass

from ochat.data.fit import to_conversation
from ochat.templates.encoder import ConversationEncoder


@dataclass
class TokenizedRecord:
    id: str
    group: str
    model: str | None
    condition: str
    tokens: list[int]
    weights: list[float]
    text: str
    conversation: dict


def canonical_conversation(record: dict) -> dict:
    """The canonical conversation dict (what `parse_conversation` reads) of a record."""
    return {"items": [{"role": m["role"], "content": m["content"], "weight": m.get("weight")}
                      for m in record["items"]],
            "condition": record.get("condition") or "", "system": record.get("system") or ""}


def decode_batch(tokenizer, tokens: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust decoder directly: transformers re-checks every id in Python first
        return backend.decode_batch(tokens, skip_special_tokens=False)
    return tokenizer.batch_decode(tokens)


def tokenize_records(encoder: ConversationEncoder, records: list[dict], max_context: int | None = None,
                     with_text: bool = True, encoded: tuple[list[list[int]], list[list[float]]] | None = None
                     ) -> tuple[list[TokenizedRecord], int]:
    """Encode a batch (one tokenizer call for all contents), or take `encoded` (the encoder's output
    for these records). Returns the rows and how many were cut at the context."""
    max_context = max_context or encoder.model_type.max_context
    tokens, weights = encoded if encoded is not None else encoder.encode([to_conversation(r) for r in records])
    cut = 0
    for i, r in enumerate(records):
        if r.get("truncated") and tokens[i] and tokens[i][-1] == encoder.eot_id:
            tokens[i].pop()
            weights[i].pop()
        if len(tokens[i]) > max_context:
            tokens[i] = tokens[i][:max_context]
            weights[i] = weights[i][:max_context]
            cut += 1
    texts = decode_batch(encoder.tokenizer, tokens) if with_text else [""] * len(records)
    rows = [TokenizedRecord(id=r["id"], group=r.get("group") or r["id"], model=r.get("model"),
                            condition=r.get("condition") or "", tokens=t, weights=w, text=text,
                            conversation=canonical_conversation(r))
            for r, t, w, text in zip(records, tokens, weights, texts)]
    return rows, cut
