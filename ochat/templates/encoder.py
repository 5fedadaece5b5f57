"""Conversations -> token ids and per-token loss weights, by token-level concatenation.

Each piece (role prefix, message content) is tokenized on its own and the ids are concatenated,
exactly as the released OpenChat models were trained (tokenize(A) + tokenize(B) != tokenize(A + B)).
Contents are tokenized with `split_special_tokens=True`, so a user typing "<|end_of_turn|>" gets
plain-text ids, never a turn boundary; prefixes may hold special tokens (3.6's headers). All
tokenizer calls are batched: one call for the distinct contents of all conversations, one for the
distinct prefixes.
"""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase

from ochat.errors import OchatError
from ochat.templates.conversation import Conversation
from ochat.templates.registry import ModelType, get_model_type

# A piece: (kind, text, weight); kind "bos" / "eot" (one special token), "prefix" or "content".
Piece = tuple[str, str, float]


def conversation_pieces(mt: ModelType, conv: Conversation, inference: bool = False,
                        condition: str | None = None) -> list[Piece]:
    """The layout of one conversation. Training mode: weights from the messages (default 1 assistant /
    0 user). Inference mode: the assistant prefix at the end; `condition` overrides the conversation's."""
    if condition is None:
        condition = conv.condition or (mt.inference_condition if inference else "")
    pieces: list[Piece] = [("bos", mt.bos, 0.0)] if mt.bos else []
    if mt.condition_turn:
        pieces += [("prefix", mt.condition_text(condition), 0.0), ("eot", mt.eot, 0.0)]
    system = mt.clean(conv.system or mt.default_system)
    if system:
        if mt.system_prefix:
            pieces.append(("prefix", mt.role_prefix("system", condition), 0.0))
        pieces.append(("content", system, 0.0))
        if mt.system_eot:
            pieces.append(("eot", mt.eot, 0.0))
    for msg in conv.items:
        w = float(msg.weight if msg.weight is not None else (1.0 if msg.role == "assistant" else 0.0))
        pieces += [("prefix", mt.role_prefix(msg.role, condition), 0.0), ("content", mt.clean(msg.content), w)]
        if msg.role == "assistant" or mt.eot_after_user:
            pieces.append(("eot", mt.eot, w))
    if inference:
        pieces.append(("prefix", mt.role_prefix("assistant", condition), 0.0))
    return pieces


class ConversationEncoder:
    def __init__(self, model_type: ModelType | str, tokenizer: PreTrainedTokenizerBase):
        self.model_type = get_model_type(model_type) if isinstance(model_type, str) else model_type
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.model_type.special_tokens if t not in vocab]
        if missing:
            raise OchatError(f"tokenizer lacks the special tokens {missing} of model type "
                             f"'{self.model_type.name}' (run `ochat model add-eot`)")
        self.bos_ids = [tokenizer.convert_tokens_to_ids(self.model_type.bos)] if self.model_type.bos else []
        self.eot_ids = [tokenizer.convert_tokens_to_ids(self.model_type.eot)]
        self.eot_id = self.eot_ids[0]

    def _tokenize(self, texts: list[str], split_special: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special,
                              return_attention_mask=False)["input_ids"]

    def encode(self, conversations: Sequence[Conversation], inference: bool = False,
               condition: str | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Encode a batch (see `conversation_pieces` for the modes)."""
        layouts = [conversation_pieces(self.model_type, c, inference, condition) for c in conversations]
        distinct: dict[str, dict[str, int]] = {"prefix": {}, "content": {}}
        for pieces in layouts:
            for kind, text, _ in pieces:
                if kind in distinct:
                    distinct[kind].setdefault(text, len(distinct[kind]))
        ids = {"prefix": self._tokenize(list(distinct["prefix"]), split_special=False),
               "content": self._tokenize(list(distinct["content"]), split_special=True)}
        all_tokens: list[list[int]] = []
        all_weights: list[list[float]] = []
        for pieces in layouts:
            tokens: list[int] = []
            weights: list[float] = []
            for kind, text, w in pieces:
                piece = (self.bos_ids if kind == "bos" else self.eot_ids if kind == "eot"
                         else ids[kind][distinct[kind][text]])
                tokens += piece
                weights += [w] * len(piece)
            all_tokens.append(tokens)
            all_weights.append(weights)
        return all_tokens, all_weights

    def encode_one(self, conversation: Conversation, inference: bool = False,
                   condition: str | None = None) -> tuple[list[int], list[float]]:
        tokens, weights = self.encode([conversation], inference=inference, condition=condition)
        return tokens[0], weights[0]
