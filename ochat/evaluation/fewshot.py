"""`ochat eval bench`: few-shot multiple-choice and math sets, accuracy per set and overall.

A set is `DIR/**/NAME.jsonl`, one `{"question", "label"[, "options"][, "kind"]}` per line, with the
few-shot examples already inside the question (as in OpenChat's and chain-of-thought-hub's sets).
The answer is pulled out of the model's reply the way those harnesses do it:
- mc (label "A" or "(A)"): the option after "the answer is", else the first standalone option letter
  (AGIEval's rule);
- number (GSM8K): the number after "the answer is" or "####", else the last number in the reply;
- text (free-form BBH): what follows "the answer is", without the final period.
A reply where nothing can be extracted counts as unmatched (and wrong).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ochat.errors import OchatError
from ochat.evaluation.answers import endpoint
from ochat.evaluation.client import RetryPolicy, chat, make_client, run_parallel, with_retries
from ochat.evaluation.files import read_jsonl, write_jsonl
from ochat.utils.atomic import atomic_write_text

_LETTER_LABEL = re.compile(r"^\(?([A-Z])\)?$")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.I)


@dataclass
class Item:
    set: str
    index: int
    question: str
    label: str
    kind: str
    letters: str


def infer_kind(label: str) -> str:
    if _LETTER_LABEL.match(label.strip()):
        return "mc"
    return "number" if _to_number(label) is not None else "text"


def _to_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def _after_answer_is(response: str) -> str | None:
    parts = _ANSWER_IS.split(response)
    return parts[-1].strip() if len(parts) > 1 else None


def extract(kind: str, response: str, letters: str = "ABCDE") -> str | None:
    """The answer in a reply, or None when the reply has none that can be matched."""
    if kind == "mc":
        tail = _after_answer_is(response)
        for text in ([tail] if tail is not None else []) + [response]:
            m = re.search(rf"\(([{letters}])\)", text) or re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
            if m:
                return m.group(1)
        return None
    if kind == "number":
        tail = _after_answer_is(response)
        if tail is None and "####" in response:
            tail = response.rsplit("####", 1)[1]
        if tail is not None:
            m = _NUMBER.search(tail)
            if m:
                return _norm_number(m.group(0))
        found = _NUMBER.findall(response)
        return _norm_number(found[-1]) if found else None
    tail = _after_answer_is(response)
    if tail is None:
        return None
    tail = tail.splitlines()[0].strip() if tail else ""
    return tail[:-1] if tail.endswith(".") else tail


def _norm_number(s: str) -> str:
    v = _to_number(s)
    return s if v is None else (str(int(v)) if v == int(v) else repr(v))


def is_correct(kind: str, predicted: str | None, label: str) -> bool:
    if predicted is None:
        return False
    if kind == "mc":
        return predicted == _LETTER_LABEL.match(label.strip()).group(1)
    if kind == "number":
        a, b = _to_number(predicted), _to_number(label)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    norm = lambda s: " ".join(s.lower().strip().strip(string.punctuation).split())  # noqa: E731
    return norm(predicted) == norm(label)


def load_sets(d: str | Path, limit: int | None = None) -> list[Item]:
    d = Path(d)
    if not d.is_dir():
        raise OchatError(f"--eval-sets {d}: not a directory")
    files = sorted(d.rglob("*.jsonl"))
    if not files:
        raise OchatError(f"--eval-sets {d}: no *.jsonl sets")
    items = []
    for f in files:
        name = str(f.relative_to(d).with_suffix(""))
        rows = read_jsonl(f)[:limit] if limit else read_jsonl(f)
        for i, row in enumerate(rows):
            where = f"{f}:{i + 1}"
            if not isinstance(row.get("question"), str) or "label" not in row:
                raise OchatError(f"{where}: expected {{\"question\": str, \"label\": ...}}")
            label = str(row["label"])
            kind = row.get("kind") or infer_kind(label)
            if kind not in ("mc", "number", "text"):
                raise OchatError(f"{where}: field 'kind' must be mc, number or text")
            if kind == "mc" and not _LETTER_LABEL.match(label.strip()):
                raise OchatError(f"{where}: a multiple-choice label must be a letter like 'B' or '(B)', got {label!r}")
            options = row.get("options")
            n = len(options) if isinstance(options, list) and options else 5
            letters = string.ascii_uppercase[:max(n, ord(label.strip("() ")[0]) - 64 if kind == "mc" else 0)]
            items.append(Item(name, i, row["question"], label, kind, letters))
    return items


def summarize(results: list[dict]) -> dict[str, Any]:
    sets: dict[str, dict] = {}
    for r in results:
        s = sets.setdefault(r["set"], {"n": 0, "correct": 0, "unmatched": 0, "failed": 0})
        s["n"] += 1
        s["correct"] += r["correct"]
        s["unmatched"] += r["predicted"] is None and r["error"] is None
        s["failed"] += r["error"] is not None
    for s in sets.values():
        s["accuracy"] = s["correct"] / s["n"]
    n = sum(s["n"] for s in sets.values())
    return {"sets": dict(sorted(sets.items())),
            "overall": {"n": n, "accuracy": sum(s["correct"] for s in sets.values()) / n if n else math.nan,
                        "mean_of_sets": sum(s["accuracy"] for s in sets.values()) / len(sets) if sets else math.nan,
                        "unmatched": sum(s["unmatched"] for s in sets.values()),
                        "failed": sum(s["failed"] for s in sets.values())}}


async def generate(items: list[Item], base_url: str | None, model_name: str, max_tokens: int, parallel: int,
                   condition: str | None) -> list[dict]:
    client = make_client(base_url)
    extra = {"condition": condition} if condition else None
    results: list[dict] = [{} for _ in items]

    async def one(i: int) -> None:
        it = items[i]
        messages = [{"role": "user", "content": it.question}]
        text, error, _ = await with_retries(lambda: chat(client, model_name, messages, 0.0, max_tokens, extra),
                                            RetryPolicy(attempts=3))
        pred = extract(it.kind, text, it.letters) if text is not None else None
        results[i] = {"set": it.set, "index": it.index, "kind": it.kind, "label": it.label, "response": text,
                      "predicted": pred, "correct": is_correct(it.kind, pred, it.label), "error": error}

    try:
        await run_parallel(range(len(items)), one, parallel, desc="bench")  # the server batches them
    finally:
        await client.close()
    return results


def run_bench(eval_sets: str, model_dir: str | None, api_base: str | None, model_name: str | None, out: str | None,
              max_tokens: int = 512, parallel: int = 32, condition: str | None = None, limit: int | None = None,
              console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    items = load_sets(eval_sets, limit)
    with endpoint(model_dir, api_base, model_name) as (base_url, served):
        results = asyncio.run(generate(items, base_url, served, max_tokens, parallel, condition))
    summary = summarize(results)
    table = Table(title=f"few-shot accuracy ({served})")
    for col in ("set", "n", "accuracy %", "unmatched", "failed"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for name, s in summary["sets"].items():
        table.add_row(name, str(s["n"]), f"{100 * s['accuracy']:.1f}", str(s["unmatched"]), str(s["failed"]))
    o = summary["overall"]
    table.add_row("overall (all questions)", str(o["n"]), f"{100 * o['accuracy']:.1f}", str(o["unmatched"]), str(o["failed"]))
    table.add_row("mean of sets", "", f"{100 * o['mean_of_sets']:.1f}", "", "")
    Console().print(table)
    if out:
        write_jsonl(Path(out) / "results.jsonl", results)
        atomic_write_text(Path(out) / "summary.json", json.dumps({"model": served, **summary}, indent=2) + "\n")
        console.print(f"bench: results -> {Path(out) / 'results.jsonl'}, summary -> {Path(out) / 'summary.json'}")
    return summary
