"""The votes file the web chat's compare view appends to (`ochat serve --votes-file`): one record per
vote, in the fields of a pairwise judgment so that `ochat.evaluation.votes` ranks them and `ochat eval
report` reads them like judgments."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from ochat.utils.atomic import append_jsonl

WINNERS = ("model_1", "model_2", "tie")


def vote_record(model_1: str, model_2: str, winner: str, messages: list[dict] | None = None,
                answer_1: str = "", answer_2: str = "") -> dict[str, Any]:
    """One vote as the votes file stores it (ValueError on a bad `winner` or a model against itself)."""
    if winner not in WINNERS:
        raise ValueError(f"winner: expected one of {', '.join(WINNERS)} (got {winner!r})")
    if model_1 == model_2:
        raise ValueError("model_1 and model_2 must be two different models")
    return {"mode": "pairwise", "judge": "human", "model_1": model_1, "model_2": model_2, "winner": winner,
            "messages": messages or [], "answer_1": answer_1, "answer_2": answer_2, "time": time.time(),
            "id": f"vote-{uuid.uuid4().hex[:16]}"}


def append_vote(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one vote (one write of one line, fsynced: a crash loses at most that line, torn, and read
    skips a torn last line). Several server processes may append to the same file."""
    append_jsonl(path, record, durable=True)
