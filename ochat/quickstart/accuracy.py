"""Held-out exact-match accuracy: greedy answers of a trained model to the test questions.

Prompts are built by the same encoder as the training data (token-level concatenation, the model
type's layout), with the C-RLFT condition given, e.g. the expert's `GPT4 Correct`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ochat.models.model_dir import ModelDir
from ochat.synthetic.quickstart_corpus import Question
from ochat.templates.conversation import Conversation, Message


@torch.no_grad()
def exact_match(model_dir: str | os.PathLike, questions: Sequence[Question], condition: str,
                batch_size: int = 64, max_new_tokens: int = 16, progress: bool = True) -> dict:
    """{"accuracy", "per_task": {task: accuracy}, "correct", "total", "examples": [...]}."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    model = ModelDir(model_dir)
    tok = model.tokenizer
    encoder = model.encoder()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    convs = [Conversation(items=[Message(role="user", content=q.question)]) for q in questions]
    prompts, _ = encoder.encode(convs, inference=True, condition=condition)
    pad = tok.pad_token_id if tok.pad_token_id is not None else encoder.eot_id
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    examples = []
    bar = tqdm(total=len(questions), desc="evaluate", unit="q", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        # left padding, so every prompt ends where generation starts
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=encoder.eot_id, pad_token_id=pad)
        for q, gen in zip(questions[start:start + batch_size], out[:, width:].tolist()):
            if encoder.eot_id in gen:
                gen = gen[:gen.index(encoder.eot_id)]
            pred = tok.decode(gen, skip_special_tokens=True).strip()
            ok = pred == q.answer
            hits[q.task][0] += ok
            hits[q.task][1] += 1
            if len(examples) < 6 or (not ok and len(examples) < 9):
                examples.append({"question": q.question, "answer": pred, "gold": q.answer, "correct": ok})
        bar.update(len(batch))
    bar.close()
    correct = sum(c for c, _ in hits.values())
    return {"accuracy": correct / max(1, len(questions)), "correct": correct, "total": len(questions),
            "condition": condition, "per_task": {t: c / n for t, (c, n) in sorted(hits.items())},
            "examples": examples}
