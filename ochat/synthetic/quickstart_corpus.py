"""A mixed-quality chat corpus that ochat writes itself, for the quickstart, `ochat bench crlft` and
`ochat data synth --kind quickstart`.

Two sources answer the same kinds of questions, as ShareGPT mixed GPT-4 and GPT-3.5 conversations:
- an "expert" (labelled `Model: GPT-4`) that is always right;
- a "novice" (labelled `Model: Default (GPT-3.5)`) that is often wrong, and wrong *systematically*
  (it adds a carry where there is none and drops the real one, echoes a word instead of reversing
  it, capitalises only the first letter), so a model trained on everything alike learns its errors.

The tasks are ones a tiny transformer learns from scratch in minutes: a table of facts and small
sums, asked with three phrasings in training. The held-out test questions use a fourth phrasing
that never appears in the training corpus, so they test the facts, not the memorised strings.

    capital   What is the capital of Australia?      -> Canberra   (novice: Sydney, the famous city)
    add       What is 4 + 7?                         -> 11         (novice: one too many, 12)
    opposite  What is the opposite of hot?           -> cold       (novice: echoes the word, hot)

Written as ShareGPT pages (`pages/*.html`, a Next.js `__NEXT_DATA__` script with ChatGPT's HTML
answers) and a ShareGPT JSON dump (`sharegpt.json`), plus `test.jsonl` (held-out questions with gold
answers) and `corpus.json` (what was written). Deterministic for a seed.
"""

from __future__ import annotations

import html
import json
import os
import random
from dataclasses import asdict, dataclass

from ochat.synthetic.sharegpt_pages import page_html
from ochat.utils.atomic import atomic_dir

EXPERT_LABEL = "Model: GPT-4"
NOVICE_LABEL = "Model: Default (GPT-3.5)"

# country -> (capital, the better-known city a novice names instead)
CAPITALS = {
    "Australia": ("Canberra", "Sydney"), "Canada": ("Ottawa", "Toronto"), "Turkey": ("Ankara", "Istanbul"),
    "Brazil": ("Brasilia", "Rio"), "Switzerland": ("Bern", "Zurich"), "Morocco": ("Rabat", "Casablanca"),
    "Nigeria": ("Abuja", "Lagos"), "Vietnam": ("Hanoi", "Saigon"), "India": ("Delhi", "Mumbai"),
    "China": ("Beijing", "Shanghai"), "Pakistan": ("Islamabad", "Karachi"), "Tanzania": ("Dodoma", "Zanzibar"),
    "Bolivia": ("Sucre", "La Paz"), "Scotland": ("Edinburgh", "Glasgow"), "Italy": ("Rome", "Milan"),
    "Spain": ("Madrid", "Barcelona"), "Germany": ("Berlin", "Munich"), "Japan": ("Tokyo", "Osaka"),
    "Egypt": ("Cairo", "Alexandria"), "Russia": ("Moscow", "Petersburg"), "Kenya": ("Nairobi", "Mombasa"),
    "Chile": ("Santiago", "Valparaiso"), "Peru": ("Lima", "Cusco"), "Greece": ("Athens", "Thessaloniki"),
    "Poland": ("Warsaw", "Krakow"), "Norway": ("Oslo", "Bergen"), "Ireland": ("Dublin", "Cork"),
    "Portugal": ("Lisbon", "Porto"), "Israel": ("Jerusalem", "Haifa"), "Ecuador": ("Quito", "Guayaquil"),
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "old": "young", "rich": "poor", "early": "late", "open": "closed", "wet": "dry", "hard": "soft",
    "loud": "quiet", "full": "empty", "strong": "weak", "high": "low", "long": "short", "thick": "thin",
    "clean": "dirty", "cheap": "expensive", "near": "far", "heavy": "light", "first": "last", "good": "bad",
    "inside": "outside", "win": "lose", "push": "pull", "buy": "sell", "start": "finish", "true": "false",
}
TRAIN_PHRASINGS = {
    "capital": ["What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?"],
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."],
    "opposite": ["What is the opposite of {x}?", "Give the antonym of {x}.", "Name the opposite of {x}."],
}
TEST_PHRASINGS = {"capital": "Tell me the capital of {x}.", "add": "How much is {a} + {b}?",
                  "opposite": "Tell me the opposite of {x}."}
TASKS = tuple(TRAIN_PHRASINGS)


@dataclass(frozen=True)
class Question:
    task: str
    question: str
    answer: str
    mistake: str = ""  # the novice's systematic wrong answer


def make_question(task: str, rng: random.Random, held_out: bool = False) -> Question:
    """A question of `task` in a training phrasing (or the held-out test phrasing)."""
    template = TEST_PHRASINGS[task] if held_out else rng.choice(TRAIN_PHRASINGS[task])
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        capital, famous = CAPITALS[country]
        return Question(task, template.format(x=country), capital, famous)
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return Question(task, template.format(a=a, b=b), str(a + b), str(a + b + 1))
    if task == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return Question(task, template.format(x=word), OPPOSITES[word], word)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def novice_mistake(q: Question) -> str:
    """The novice's systematic wrong answer to `q`."""
    return q.mistake


@dataclass
class CorpusConfig:
    conversations: int = 6000       # training conversations (both sources)
    expert_fraction: float = 0.3    # share of conversations from the expert (GPT-4)
    novice_error_rate: float = 0.7  # chance that a novice answer is wrong
    max_turns: int = 3              # question/answer pairs per conversation (1..max_turns)
    test_questions: int = 90        # held-out questions (an equal share per task; distinct while possible)
    page_fraction: float = 0.25     # share written as .html pages (the rest go to the JSON dump)
    seed: int = 0
    tasks: tuple[str, ...] = TASKS


def text_answer_html(text: str) -> str:
    """An answer as ChatGPT's page rendered it."""
    return f'<div class="markdown prose w-full break-words dark:prose-invert light"><p>{html.escape(text)}</p></div>'


def held_out_questions(cfg: CorpusConfig) -> list[Question]:
    rng = random.Random(f"test-{cfg.seed}")
    seen: set[str] = set()
    out: list[Question] = []
    tries = 0
    while len(out) < cfg.test_questions:
        q = make_question(cfg.tasks[len(out) % len(cfg.tasks)], rng, held_out=True)
        tries += 1
        if q.question not in seen or tries > 50 * cfg.test_questions:  # repeats once every one is taken
            seen.add(q.question)
            out.append(q)
    return out


def write_quickstart_corpus(out: str | os.PathLike, cfg: CorpusConfig | None = None, overwrite: bool = False) -> dict:
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
            assert q.question not in test_texts  # held out: the test phrasing never appears in training
            wrong = not expert and rng.random() < cfg.novice_error_rate
            answer = novice_mistake(q) if wrong else q.answer
            counts["answers"] += 1
            counts["wrong_answers"] += answer != q.answer
            items += [{"from": "human", "value": q.question}, {"from": "gpt", "value": text_answer_html(answer)}]
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
            (tmp / "pages" / f"{conv_id}.html").write_text(page_html(conv_id, model, items, views, title=items[0]["value"][:40]), encoding="utf-8")
        (tmp / "sharegpt.json").write_text(json.dumps(dump, ensure_ascii=False, indent=0), encoding="utf-8")
        (tmp / "test.jsonl").write_text("".join(json.dumps({"task": q.task, "question": q.question, "answer": q.answer})
                                                + "\n" for q in test), encoding="utf-8")
        (tmp / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def read_test(path: str | os.PathLike) -> list[Question]:
    with open(path, encoding="utf-8") as f:
        return [Question(**json.loads(line)) for line in f if line.strip()]
