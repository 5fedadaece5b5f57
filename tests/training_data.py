"""The training tests' data and model (test helpers, not part of the package).

- `counting_conversations`: a learnable task ("count from 3" -> "4 5 6 7") with distractor names,
  so held-out prompts test generalisation, not memorisation; `write_conversations` encodes them into
  the tokenized Parquet contract.
- `make_small_model`: a tiny Llama with its own few-hundred-token tokenizer.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from ochat.data.tokenized import write_tokenized
from ochat.models.model_dir import ModelDir
from ochat.models.tokenizers import load_tokenizer, tokenizer_fingerprint
from ochat.templates.conversation import Conversation
from ochat.templates.encoder import ConversationEncoder

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yolanda"]


def counting_conversations(n: int, seed: int, names: Sequence[str] = NAMES, steps: int = 4) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, 10 - steps)
        name = rng.choice(list(names))
        answer = " ".join(str(start + k + 1) for k in range(steps))
        out.append(Conversation.model_validate({"items": [
            {"role": "user", "content": f"{name} asks: count up from {start}"},
            {"role": "assistant", "content": answer}]}))
    return out


def write_conversations(model_dir: str | os.PathLike, path: str | os.PathLike,
                        conversations: Sequence[Conversation]) -> Path:
    """Encode conversations with the model's template and tokenizer into one Parquet split."""
    model_type = ModelDir(model_dir).model_type.name
    tokenizer = load_tokenizer(model_dir)
    tokens, weights = ConversationEncoder(model_type, tokenizer).encode(list(conversations))
    return write_tokenized(path, tokens, weights, model_type, tokenizer_fingerprint(tokenizer))


def make_small_model(out: str | os.PathLike, model_type: str = "opencoder", vocab_size: int = 300,
                     hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer of a few hundred tokens trained here: a model whose
    every step takes milliseconds on one CPU core (a 32k vocabulary would dominate the compute)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ochat.models.tiny import make_tiny_model

    out = Path(out)
    text = [f"{c.items[0].content} {c.items[1].content}" for c in counting_conversations(200, seed)]
    text += ["Hello there! How are you? I am fine, thank you.", "The quick brown fox jumps over the lazy dog."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok_dir = out.parent / f".{out.name}.tokenizer"
    fast.save_pretrained(str(tok_dir))
    return make_tiny_model(out, tok_dir, model_type, arch="llama", hidden_size=hidden_size, layers=layers,
                           heads=heads, max_positions=2048, seed=seed)
