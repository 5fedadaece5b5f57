"""`ochat eval answers`: a model's answers to a question file, in FastChat's answer format.

The model is either a local directory (served in-process by `ochat serve`'s engine) or any
OpenAI-compatible endpoint (`--api-base`, `OPENAI_API_KEY`), e.g. gpt-3.5-turbo as the baseline.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ochat.errors import OchatError
from ochat.evaluation.client import RetryPolicy, chat, make_client, run_parallel, with_retries
from ochat.evaluation.files import (Question, append_jsonl, load_questions, new_answer, read_jsonl, sort_key,
                                    write_jsonl)
from ochat.serving.inprocess import endpoint
from ochat.utils.atomic import atomic_write_text

# FastChat's MT-bench sampling: creative categories sample, knowledge ones barely, the rest greedy.
DEFAULT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.0


def parse_temperature_map(specs: list[str] | None) -> dict[str, float]:
    """`["writing=0.5,coding=0.2", "*=0.3"]` -> overrides of the default map (`*` is every other category)."""
    temps = dict(DEFAULT_TEMPERATURES)
    temps["*"] = DEFAULT_TEMPERATURE
    for spec in specs or []:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            try:
                t = float(value)
            except ValueError:
                t = -1.0
            if not sep or not name.strip() or not 0.0 <= t <= 2.0:
                raise OchatError(f"--temperature-map {part!r}: expected CATEGORY=T with 0 <= T <= 2 (e.g. writing=0.7, *=0)")
            temps[name.strip()] = t
    return temps


def temperature_for(category: str, temps: dict[str, float]) -> float:
    return temps.get(category, temps.get("*", DEFAULT_TEMPERATURE))


@dataclass
class AnswersSummary:
    answered: int          # new answers written
    skipped: int           # already in the answer file (resumed)
    failed: int            # questions that failed every try (in `errors`, not in the answers)
    out: str
    errors: str | None


def errors_path(out: Path) -> Path:
    # Not *.jsonl: FastChat reads every DIR/*.jsonl as a model's answers.
    return out.with_name(out.stem + ".errors.json")


def load_done(out: Path, questions: list[Question]) -> dict[Any, dict]:
    """Answers already in `out` (resume); a torn last line from a killed run is dropped."""
    if not out.exists():
        return {}
    n_turns = {q.question_id: len(q.turns) for q in questions}
    done = {}
    for row in read_jsonl(out, tolerate_torn_tail=True):
        qid = row.get("question_id")
        try:
            complete = len(row["choices"][0]["turns"]) == n_turns[qid]
        except (KeyError, IndexError, TypeError):
            complete = qid not in n_turns  # answers to other questions are kept as they are
        if complete:
            done[qid] = row
    return done


async def answer_all(questions: list[Question], out: Path, base_url: str | None, model_name: str, model_id: str,
                     max_tokens: int = 1024, parallel: int = 8, condition: str | None = None,
                     temperatures: dict[str, float] | None = None, policy: RetryPolicy | None = None,
                     console: Console | None = None) -> AnswersSummary:
    """Answer every question not yet in `out`."""
    console = console or Console(stderr=True)
    temps = temperatures or parse_temperature_map(None)
    policy = policy or RetryPolicy()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(out, questions)
    write_jsonl(out, sorted(done.values(), key=lambda r: sort_key(r.get("question_id"))))  # drop torn/partial lines
    todo = [q for q in questions if q.question_id not in done]
    errors: list[dict] = []
    client = make_client(base_url)
    extra = {"condition": condition} if condition else None

    async def answer(q: Question) -> None:
        messages, turns = [], []
        temperature = temperature_for(q.category, temps)
        for i, turn in enumerate(q.turns):
            messages.append({"role": "user", "content": turn})
            text, error, attempts = await with_retries(
                lambda: chat(client, model_name, messages, temperature, max_tokens, extra), policy)
            if error is not None:
                errors.append({"question_id": q.question_id, "turn": i + 1, "error": error,
                               "attempts": attempts, "tstamp": time.time()})
                return  # never write a partial or error answer
            turns.append(text)
            messages.append({"role": "assistant", "content": text})  # the next turn sees this answer
        append_jsonl(out, new_answer(q.question_id, model_id, turns))

    try:
        await run_parallel(todo, answer, parallel, desc=f"answers {model_id}")
    finally:
        await client.close()
        rows = read_jsonl(out, tolerate_torn_tail=True)
        write_jsonl(out, sorted(rows, key=lambda r: sort_key(r.get("question_id"))))
        err_file = errors_path(out)
        if errors:
            errors.sort(key=lambda e: sort_key(e["question_id"]))
            atomic_write_text(err_file, json.dumps(errors, indent=1, ensure_ascii=False) + "\n")
        elif err_file.exists():
            err_file.unlink()
    return AnswersSummary(len(todo) - len(errors), len(questions) - len(todo), len(errors), str(out),
                          str(err_file) if errors else None)


def run_answers(bench: str, out: str, model_dir: str | None = None, api_base: str | None = None,
                model_name: str | None = None, model_id: str | None = None, max_tokens: int = 1024,
                parallel: int = 8, condition: str | None = None, temperature_map: list[str] | None = None,
                retries: int = 4, backoff: float = 1.0, limit: int | None = None) -> AnswersSummary:
    questions = load_questions(bench)[:limit] if limit else load_questions(bench)
    temps = parse_temperature_map(temperature_map)
    out_path = Path(out)
    if out_path.suffix != ".jsonl":
        raise OchatError(f"--out {out}: expected a .jsonl file (FastChat reads DIR/MODEL.jsonl)")
    model_id = model_id or out_path.stem
    with endpoint(model_dir, api_base, model_name) as (base_url, served_name):
        return asyncio.run(answer_all(questions, out_path, base_url, served_name, model_id, max_tokens, parallel,
                                      condition, temps, RetryPolicy(attempts=retries, backoff=backoff)))
