"""Question, answer and judgment files (JSON lines), read strictly and written so nothing is lost."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ochat.errors import OchatError
from ochat.utils.atomic import append_jsonl, atomic_write_text  # noqa: F401 (re-exported)


@dataclass
class Question:
    question_id: Any
    category: str
    turns: list[str]
    reference: list[str] | None = None  # MT-bench's inline reference answers (math/reasoning/coding)
    extra: dict = field(default_factory=dict)


def read_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> list[dict]:
    """Parse a JSON-lines file. A half-written last line (a killed run) is dropped when tolerated."""
    path = Path(path)
    if not path.is_file():
        raise OchatError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines):
                break
            raise OchatError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise OchatError(f"{path}:{i}: expected a JSON object per line")
        rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sort_key(qid: Any) -> tuple:
    return (0, qid, "") if isinstance(qid, (int, float)) else (1, 0, str(qid))


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Vicuna format `{"question_id", "text", "category"}` or MT-bench format `{"question_id", "category", "turns"}`."""
    questions, seen = [], set()
    for i, row in enumerate(read_jsonl(path), 1):
        where = f"{path}:{i}"
        if "question_id" not in row:
            raise OchatError(f"{where}: missing field 'question_id'")
        if "turns" in row:
            turns = row["turns"]
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise OchatError(f"{where}: field 'turns' must be a non-empty list of strings")
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise OchatError(f"{where}: field 'text' must be a string")
            turns = [row["text"]]
        else:
            raise OchatError(f"{where}: expected 'turns' (MT-bench format) or 'text' (Vicuna format)")
        qid = row["question_id"]
        if qid in seen:
            raise OchatError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        ref = row.get("reference")
        extra = {k: v for k, v in row.items() if k not in ("question_id", "category", "turns", "text", "reference")}
        questions.append(Question(qid, str(row.get("category", "general")), turns, ref, extra))
    if not questions:
        raise OchatError(f"{path}: no questions")
    return questions


def answer_turns(row: dict, where: str) -> list[str]:
    try:
        turns = row["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise OchatError(f"{where}: expected FastChat answer format with choices[0].turns") from None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise OchatError(f"{where}: choices[0].turns must be a list of strings")
    return turns


def load_answers(path: str | os.PathLike) -> dict[Any, dict]:
    """One FastChat answer file -> {question_id: record}. The last record of a question wins (as in FastChat)."""
    out = {}
    for i, row in enumerate(read_jsonl(path, tolerate_torn_tail=True), 1):
        if "question_id" not in row:
            raise OchatError(f"{path}:{i}: missing field 'question_id'")
        answer_turns(row, f"{path}:{i}")
        out[row["question_id"]] = row
    return out


def load_answer_dir(answer_dir: str | os.PathLike) -> dict[str, dict[Any, dict]]:
    """FastChat's `load_model_answers`: `DIR/*.jsonl`, the model name is the file name."""
    answer_dir = Path(answer_dir)
    if not answer_dir.is_dir():
        raise OchatError(f"--answers {answer_dir}: not a directory (expected DIR/MODEL.jsonl answer files)")
    models = {p.stem: load_answers(p) for p in sorted(answer_dir.glob("*.jsonl"))}
    if not models:
        raise OchatError(f"--answers {answer_dir}: no *.jsonl answer files")
    return models


def load_references(path: str | os.PathLike | None, questions: list[Question]) -> dict[Any, list[str]]:
    """Reference answers from the questions themselves and/or a file in answer format (FastChat's gpt-4.jsonl)."""
    refs = {q.question_id: list(q.reference) for q in questions if q.reference}
    if path:
        for qid, row in load_answers(path).items():
            refs.setdefault(qid, answer_turns(row, str(path)))
    return refs


def new_answer(question_id: Any, model_id: str, turns: list[str]) -> dict:
    """A line of FastChat's answer format."""
    return {"question_id": question_id, "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()}
