"""Fit conversations to a model type's context: truncate (OpenChat v1) or split at turn boundaries (Vicuna).

- truncate: keep the messages that fit; an assistant answer that crosses the limit is cut at a
  token boundary and marked `"truncated": true` (the tokenizer then leaves out its end-of-turn,
  so the model never learns to stop mid-sentence); a user turn that crosses it is dropped.
- split: FastChat's `split_long_conversation`: consecutive user/assistant exchanges are grouped
  into pieces that each fit (ids `ID_0`, `ID_1`, ...; `group` keeps the original id); an exchange
  longer than the context on its own is truncated as above.

Lengths are exact (the same token-level concatenation as `ConversationEncoder`), but only
conversations that might not fit are tokenized: a token covers at least one UTF-8 byte, so a
conversation whose byte count (plus prefixes) is within the context needs no tokenizer call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ochat.templates.conversation import Conversation, Message
from ochat.templates.encoder import ConversationEncoder

FitMode = Literal["truncate", "split"]


def default_fit_mode(model_type: str) -> FitMode:
    return "split" if model_type.startswith("vicuna") else "truncate"


@dataclass
class FitResult:
    pieces: list[dict] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) per dropped piece
    truncated: int = 0


def to_conversation(record: dict) -> Conversation:
    return Conversation(items=[Message(role=m["role"], content=m["content"], weight=m.get("weight"))
                               for m in record["items"]],
                        system=record.get("system") or "", condition=record.get("condition") or "")


class Fitter:
    def __init__(self, encoder: ConversationEncoder, mode: FitMode, max_context: int | None = None):
        if mode not in ("truncate", "split"):
            raise ValueError(f"fit mode {mode!r}")
        self.encoder = encoder
        self.mode = mode
        self.max_context = max_context or encoder.model_type.max_context
        mt = encoder.model_type
        self._bos = len(encoder.bos_ids)
        # prefix + end-of-turn + a dummy-prefix token, bounded by bytes
        self._overhead = lambda role, cond: len(mt.role_prefix(role, cond).encode()) + 4

    def _upper_bound(self, record: dict) -> int:
        mt = self.encoder.model_type
        cond = record.get("condition") or ""
        system = record.get("system") or mt.default_system
        n = self._bos + (len(system.encode()) + self._overhead("system", cond) if system else 0)
        return n + sum(len(m["content"].encode()) + self._overhead(m["role"], cond) for m in record["items"])

    def _lengths(self, record: dict, stop_above: int | None = None) -> tuple[int, list[int]]:
        """(tokens before the first message, tokens of each message), one exchange at a time; with
        `stop_above`, stop once the conversation so far exceeds it (the rest need not be tokenized)."""
        cond = record.get("condition") or ""
        system = record.get("system") or ""
        items = record["items"]
        base = -1
        lens: list[int] = []
        for k in range(0, len(items), 2):
            convs = [Conversation(items=[Message(role=m["role"], content=m["content"])], system=system, condition=cond)
                     for m in items[k:k + 2]]
            if base < 0:
                convs.insert(0, Conversation(items=[], system=system, condition=cond))
            tokens, _ = self.encoder.encode(convs)
            if base < 0:
                base = len(tokens.pop(0))
            lens += [len(t) - base for t in tokens]
            if stop_above is not None and base + sum(lens) > stop_above:
                break
        return base, lens

    def _cut(self, content: str, total_len: int, room: int) -> str:
        """The longest prefix of an answer whose tokens fit in `room`, given the message's total length
        (prefix + content + end-of-turn); "" if nothing fits."""
        tok = self.encoder.tokenizer
        enc = tok(content, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc.get("offset_mapping")
        n_tokens = room - (total_len - len(ids))  # minus the prefix and end-of-turn
        if n_tokens <= 0:
            return ""
        if n_tokens >= len(ids):
            return content
        if not offsets:  # a slow tokenizer: decode the ids instead
            return tok.decode(ids[:n_tokens])
        return content[:offsets[n_tokens - 1][1]]

    def _truncate(self, items: list[dict], lens: list[int], budget: int) -> tuple[list[dict], bool]:
        out: list[dict] = []
        used = 0
        truncated = False
        for m, n in zip(items, lens):
            if used + n <= budget:
                out.append(m)
                used += n
                continue
            if m["role"] == "assistant":
                cut = self._cut(m["content"], n, budget - used).rstrip()
                if cut:
                    out.append({**m, "content": cut})
                    truncated = True
            break
        if out and out[-1]["role"] == "user":
            out.pop()
        return out, truncated

    def fit(self, record: dict, lengths: tuple[int, list[int]] | None = None) -> FitResult:
        """`lengths`: (tokens before the first message, tokens of each message), when already known."""
        if lengths is None:
            if self._upper_bound(record) <= self.max_context:
                return FitResult(pieces=[record])
            lengths = self._lengths(record, stop_above=self.max_context if self.mode == "truncate" else None)
        base, lens = lengths
        budget = self.max_context - base
        items = record["items"]
        if len(lens) == len(items) and sum(lens) <= budget:
            return FitResult(pieces=[record])
        result = FitResult()
        if self.mode == "truncate":
            groups = [(items[:len(lens)], lens)]
        else:
            groups, cur, cur_lens, used = [], [], [], 0
            for k in range(0, len(items), 2):
                ex, ex_lens = items[k:k + 2], lens[k:k + 2]
                if cur and used + sum(ex_lens) > budget:
                    groups.append((cur, cur_lens))
                    cur, cur_lens, used = [], [], 0
                cur, cur_lens, used = cur + ex, cur_lens + ex_lens, used + sum(ex_lens)
            groups.append((cur, cur_lens))
        for k, (g_items, g_lens) in enumerate(groups):
            pid = f"{record['id']}_{k}" if len(groups) > 1 else record["id"]
            if sum(g_lens) > budget:
                g_items, truncated = self._truncate(g_items, g_lens, budget)
                if len(g_items) < 2:
                    result.dropped.append(("too_long", f"{pid}: the first exchange does not fit in "
                                                       f"{self.max_context} tokens"))
                    continue
                if truncated:
                    result.truncated += 1
                piece = {**record, "id": pid, "items": g_items}
                if truncated:
                    piece["truncated"] = True
            else:
                piece = {**record, "id": pid, "items": g_items}
            result.pieces.append(piece)
        return result
