"""A mixed-quality chat corpus that ochat writes itself, for the quickstart and `ochat bench crlft`.

Two sources answer the same kinds of questions, as ShareGPT mixed GPT-4 and GPT-3.5 conversations:
- an "expert" (labelled `Model: GPT-4`) that is always right;
- a "novice" (labelled `Model: Default (GPT-3.5)`) that is often wrong, and wrong *systematically*
  (it adds a carry where there is none and drops the real one, echoes a word instead of reversing
  it, capitalises only the first letter), so a model trained on everything alike learns its errors.

The tasks are ones a tiny transformer learns from scratch in minutes and that test generalisation,
not memorisation: the held-out test questions never appear in the training corpus.

    add      What is 47 + 8?                    -> 55
    reverse  Reverse the letters: d o g         -> g o d
    upper    Uppercase: c a t                   -> C A T

Letters are spaced so that each is one token of the Mistral tokenizer (a word like "dog" is one
token, and reversing it would mean knowing its spelling).

Written as ShareGPT pages (`pages/*.html`, a Next.js `__NEXT_DATA__` script with ChatGPT's HTML
answers) and a ShareGPT JSON dump (`sharegpt.json`), plus `test.jsonl` (held-out questions with gold
answers) and `corpus.json` (what was written). Deterministic for a seed.
"""

from __future__ import annotations

import html
import json
import os
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from ochat.utils.atomic import atomic_dir

TASKS = ("add", "reverse", "upper")
EXPERT_LABEL = "Model: GPT-4"
NOVICE_LABEL = "Model: Default (GPT-3.5)"
WORD_LEN = 3


@dataclass(frozen=True)
class Question:
    task: str
    question: str
    answer: str


def make_question(task: str, rng: random.Random) -> Question:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        return Question(task, f"What is {a} + {b}?", str(a + b))
    letters = [rng.choice(string.ascii_lowercase) for _ in range(WORD_LEN)]
    if task == "reverse":
        return Question(task, "Reverse the letters: " + " ".join(letters), " ".join(reversed(letters)))
    if task == "upper":
        return Question(task, "Uppercase: " + " ".join(letters), " ".join(c.upper() for c in letters))
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def novice_mistake(q: Question) -> str:
    """The novice's systematic wrong answer to `q`."""
    if q.task == "add":
        a, b = (int(x) for x in q.question.removeprefix("What is ").removesuffix("?").split(" + "))
        carry = (a % 10 + b) >= 10
        return str(a + b - 10 if carry else a + b + 10)  # the carry inverted: a wrong tens digit
    letters = q.question.split(": ", 1)[1]
    if q.task == "reverse":
        return letters  # echoes the letters unreversed
    first, *rest = letters.split(" ")
    return " ".join([first.upper(), *rest])  # capitalises only the first letter


@dataclass
class CorpusConfig:
    conversations: int = 6000       # training conversations (both sources)
    expert_fraction: float = 0.3    # share of conversations from the expert (GPT-4)
    novice_error_rate: float = 0.7  # chance that a novice answer is wrong
    max_turns: int = 3              # question/answer pairs per conversation (1..max_turns)
    test_questions: int = 300       # held-out questions (an equal share per task)
    page_fraction: float = 0.25     # share written as .html pages (the rest go to the JSON dump)
    seed: int = 0
    tasks: tuple[str, ...] = TASKS


def answer_html(text: str) -> str:
    """An answer as ChatGPT's page rendered it."""
    return f'<div class="markdown prose w-full break-words dark:prose-invert light"><p>{html.escape(text)}</p></div>'


def page_html(conv_id: str, model: str, items: list[dict], views: int) -> str:
    data = {"props": {"pageProps": {"id": conv_id, "views": views,
                                    "content": {"title": items[0]["value"][:40], "model": model, "items": items}},
                      "__N_SSP": True},
            "page": "/c/[id]", "query": {"id": conv_id}, "buildId": "quickstart", "isFallback": False}
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return ('<!DOCTYPE html><html lang="en"><head><meta charSet="utf-8"/><title>ShareGPT conversation</title></head>'
            '<body><div id="__next"><main>(rendered conversation)</main></div>'
            f'<script id="__NEXT_DATA__" type="application/json">{payload}</script></body></html>\n')


def held_out_questions(cfg: CorpusConfig) -> list[Question]:
    rng = random.Random(f"test-{cfg.seed}")
    seen: set[str] = set()
    out: list[Question] = []
    while len(out) < cfg.test_questions:
        q = make_question(cfg.tasks[len(out) % len(cfg.tasks)], rng)
        if q.question not in seen:
            seen.add(q.question)
            out.append(q)
    return out


def write_corpus(out: str | os.PathLike, cfg: CorpusConfig | None = None, overwrite: bool = False) -> dict:
    """Write the corpus into the directory `out` (atomically); return its summary (also `corpus.json`)."""
    cfg = cfg or CorpusConfig()
    rng = random.Random(cfg.seed)
    test = held_out_questions(cfg)
    test_texts = {q.question for q in test}
    pages: list[tuple[str, str, list[dict], int]] = []
    dump: list[dict] = []
    counts = {"expert": 0, "novice": 0, "answers": 0, "wrong_answers": 0}
    for i in range(cfg.conversations):
        expert = rng.random() < cfg.expert_fraction
        items: list[dict] = []
        for _ in range(rng.randint(1, cfg.max_turns)):
            q = make_question(rng.choice(cfg.tasks), rng)
            while q.question in test_texts:  # held out means never seen in training
                q = make_question(q.task, rng)
            wrong = not expert and rng.random() < cfg.novice_error_rate
            answer = novice_mistake(q) if wrong else q.answer
            counts["answers"] += 1
            counts["wrong_answers"] += answer != q.answer
            items += [{"from": "human", "value": q.question}, {"from": "gpt", "value": answer_html(answer)}]
        counts["expert" if expert else "novice"] += 1
        conv_id = f"qs{cfg.seed}-{i:06d}"
        model = EXPERT_LABEL if expert else NOVICE_LABEL
        if rng.random() < cfg.page_fraction:
            pages.append((conv_id, model, items, rng.randint(1, 500)))
        else:
            dump.append({"id": conv_id, "model": model.removeprefix("Model: "), "conversations": items})

    summary = {"config": {**asdict(cfg), "tasks": list(cfg.tasks)}, "conversations": cfg.conversations,
               "pages": len(pages), "json_dump": len(dump), **counts, "test_questions": len(test),
               "expert_label": EXPERT_LABEL, "novice_label": NOVICE_LABEL}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "pages").mkdir()
        for conv_id, model, items, views in pages:
            (tmp / "pages" / f"{conv_id}.html").write_text(page_html(conv_id, model, items, views), encoding="utf-8")
        (tmp / "sharegpt.json").write_text(json.dumps(dump, ensure_ascii=False, indent=0), encoding="utf-8")
        (tmp / "test.jsonl").write_text("".join(json.dumps(asdict(q)) + "\n" for q in test), encoding="utf-8")
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def read_test(path: str | os.PathLike) -> list[Question]:
    with open(path, encoding="utf-8") as f:
        return [Question(**json.loads(line)) for line in f if line.strip()]
