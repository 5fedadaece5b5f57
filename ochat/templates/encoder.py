"""Conversations -> token ids and per-token loss weights, by token-level concatenation.

Each piece (role prefix, message content) is tokenized on its own and the ids are concatenated,
exactly as the released OpenChat models were trained (tokenize(A) + tokenize(B) != tokenize(A + B)).
Contents are tokenized with `split_special_tokens=True`, so a user typing "<|end_of_turn|>" gets
plain-text ids, never a turn boundary. All tokenizer calls are batched: one call for all contents
of all conversations, one for the distinct prefixes, one for the distinct system prompts.
"""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase

from ochat.errors import OchatError
from ochat.templates.conversation import Conversation
from ochat.templates.registry import ModelType, get_model_type


class ConversationEncoder:
    def __init__(self, model_type: ModelType | str, tokenizer: PreTrainedTokenizerBase):
        self.model_type = get_model_type(model_type) if isinstance(model_type, str) else model_type
        self.tokenizer = tokenizer
        missing = [t for t in self.model_type.special_tokens if t not in tokenizer.get_vocab()]
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

    def _prefix(self, role: str, condition: str) -> str:
        return self.model_type.role_prefix(role, condition)

    def encode(self, conversations: Sequence[Conversation], inference: bool = False,
               condition: str | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Encode a batch. Training mode: weights from the messages (default 1 assistant / 0 user).
        Inference mode: append the assistant prefix; `condition` overrides each conversation's."""
        mt = self.model_type
        default_condition = mt.inference_condition if inference else ""

        def cond_of(conv: Conversation) -> str:
            if condition is not None:
                return condition
            return conv.condition or default_condition

        prefixes: dict[tuple[str, str], int] = {}
        systems: dict[str, int] = {}
        contents: list[str] = []
        for conv in conversations:
            c = cond_of(conv)
            system = conv.system or mt.default_system
            if system:
                systems.setdefault(system, len(systems))
                if mt.system_as_role:
                    prefixes.setdefault(("system", c), len(prefixes))
            for msg in conv.items:
                prefixes.setdefault((msg.role, c), len(prefixes))
                contents.append(msg.content)
            if inference:
                prefixes.setdefault(("assistant", c), len(prefixes))

        prefix_ids = self._tokenize([self._prefix(r, c) for r, c in prefixes], split_special=False)
        system_ids = self._tokenize(list(systems), split_special=True)
        content_ids = self._tokenize(contents, split_special=True)

        all_tokens: list[list[int]] = []
        all_weights: list[list[float]] = []
        k = 0
        for conv in conversations:
            c = cond_of(conv)
            tokens: list[int] = list(self.bos_ids)
            weights: list[float] = [0.0] * len(tokens)
            system = conv.system or mt.default_system
            if system:
                piece = system_ids[systems[system]]
                if mt.system_as_role:
                    piece = prefix_ids[prefixes[("system", c)]] + piece + self.eot_ids
                elif mt.system_eot:
                    piece = piece + self.eot_ids
                tokens += piece
                weights += [0.0] * len(piece)
            for msg in conv.items:
                prefix = prefix_ids[prefixes[(msg.role, c)]]
                tokens += prefix
                weights += [0.0] * len(prefix)
                w = msg.weight if msg.weight is not None else (1.0 if msg.role == "assistant" else 0.0)
                body = content_ids[k] + (self.eot_ids if msg.role == "assistant" or mt.eot_after_user else [])
                k += 1
                tokens += body
                weights += [float(w)] * len(body)
            if inference:
                prefix = prefix_ids[prefixes[("assistant", c)]]
                tokens += prefix
                weights += [0.0] * len(prefix)
            all_tokens.append(tokens)
            all_weights.append(weights)
        return all_tokens, all_weights

    def encode_one(self, conversation: Conversation, inference: bool = False,
                   condition: str | None = None) -> tuple[list[int], list[float]]:
        tokens, weights = self.encode([conversation], inference=inference, condition=condition)
        return tokens[0], weights[0]
