"""`ochat eval alpaca-export`: answers -> AlpacaEval's input `[{"instruction", "output", "generator"}]`.

Answer files do not hold the questions' text, so the question file is needed too.
"""

from __future__ import annotations

import json
import os

from ochat.errors import OchatError
from ochat.evaluation.files import answer_turns, load_answers, load_questions, sort_key
from ochat.utils.atomic import atomic_write_text


def export(answers: str | os.PathLike, bench: str | os.PathLike, out: str | os.PathLike,
           generator: str | None = None) -> int:
    questions = {q.question_id: q for q in load_questions(bench)}
    rows = []
    for qid, rec in sorted(load_answers(answers).items(), key=lambda kv: sort_key(kv[0])):
        q = questions.get(qid)
        if q is None:
            raise OchatError(f"{answers}: question_id {qid!r} is not in {bench}")
        if len(q.turns) != 1:
            raise OchatError(f"{bench}: question {qid!r} has {len(q.turns)} turns; AlpacaEval is single-turn")
        row = {"instruction": q.turns[0], "output": answer_turns(rec, str(answers))[0],
               "generator": generator or rec.get("model_id") or os.path.splitext(os.path.basename(answers))[0]}
        if q.category:
            row["dataset"] = q.category
        rows.append(row)
    if not rows:
        raise OchatError(f"{answers}: no answers")
    atomic_write_text(out, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return len(rows)
