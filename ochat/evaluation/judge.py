"""`ochat eval judge`: GPT-4-as-judge over answer files, with evidence and position calibration.

Modes
- vicuna: the seed's pairwise review. The judge explains first and puts the two scores on the last
  line (evidence calibration); each pair is judged in both orders and the scores are mapped back to
  each side and averaged (balanced position calibration). Only the first turn of a question is
  reviewed. Prompts that put the scores on the first line (the original Vicuna ones) are not parsed:
  their replies count as failed.
- single: MT-bench 1-10 `[[rating]]`, turn 1 and turn 2 separately, with reference answers for
  math, reasoning and coding.
- pairwise-baseline / pairwise-all: `[[A]]`/`[[B]]`/`[[C]]` in both orders; if the two orders
  disagree the game is a tie.

A judgment already in the output file is kept on a re-run even if the answers or prompts have
changed since: write to a new --out to judge again.

One judgment record per unit (question x model(s) x turn) is appended as soon as it is done, so an
interrupted run resumes where it stopped. A reply that cannot be parsed is retried and then recorded
as failed (`"error"`), never scored; failed units are retried by the next run.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from ochat.errors import OchatError
from ochat.evaluation.client import RetryPolicy, Unusable, chat, make_client, run_parallel, with_retries
from ochat.evaluation.files import (Question, answer_turns, append_jsonl, load_answer_dir, load_questions,
                                    load_references, read_jsonl, sort_key, write_jsonl)
from ochat.evaluation.prompts import (NEED_REF_CATS, JudgePrompt, load_prompts, parse_pair_scores, parse_rating,
                                      parse_verdict, pick_prompt)

MODES = ("vicuna", "single", "pairwise-baseline", "pairwise-all")


@dataclass
class Unit:
    """One thing to judge: a question (and turn) for one model, or for a pair of models."""
    key: tuple
    question: Question
    turn: int
    models: tuple[str, ...]


def unit_key(rec: dict) -> tuple:
    mode = rec.get("mode")
    if mode == "vicuna":
        return (mode, rec["question_id"], rec["model"], rec["baseline"])
    if mode == "single":
        return (mode, rec["question_id"], rec["model"], rec["turn"])
    return ("pairwise", rec["question_id"], rec["model_1"], rec["model_2"], rec["turn"])


def plan_units(mode: str, questions: list[Question], answers: dict[str, dict], models: list[str],
               baseline: str | None, console: Console) -> list[Unit]:
    units, missing = [], {}

    def has(m, q, turns):
        rec = answers[m].get(q.question_id)
        ok = rec is not None and len(answer_turns(rec, m)) >= turns
        if not ok:
            missing[m] = missing.get(m, 0) + 1
        return ok

    for q in questions:
        if mode == "vicuna":
            for m in models:
                if has(m, q, 1) and has(baseline, q, 1):
                    units.append(Unit(("vicuna", q.question_id, m, baseline), q, 1, (m, baseline)))
            continue
        for turn in range(1, len(q.turns) + 1):
            if mode == "single":
                for m in models:
                    if has(m, q, turn):
                        units.append(Unit(("single", q.question_id, m, turn), q, turn, (m,)))
            else:
                pairs = ([(m, baseline) for m in models] if mode == "pairwise-baseline"
                         else list(itertools.combinations(models, 2)))
                for a, b in pairs:
                    if has(a, q, turn) and has(b, q, turn):
                        units.append(Unit(("pairwise", q.question_id, a, b, turn), q, turn, (a, b)))
    for m, n in missing.items():
        console.print(f"[yellow]warning[/]: {m} has no answer for {n} question turn(s); those are not judged")
    return units


class Judge:
    """Builds the judge's messages for a unit, calls the judge, and parses the reply."""

    def __init__(self, mode: str, prompts: list[JudgePrompt], answers: dict[str, dict], refs: dict[Any, list[str]],
                 client, judge_model: str, temperature: float, max_tokens: int, policy: RetryPolicy,
                 prompts_source: str):
        self.mode, self.prompts, self.answers, self.refs = mode, prompts, answers, refs
        self.client, self.judge_model, self.temperature, self.max_tokens = client, judge_model, temperature, max_tokens
        self.policy, self.source = policy, prompts_source

    def turns(self, model: str, q: Question) -> list[str]:
        return answer_turns(self.answers[model][q.question_id], model)

    def prompt_for(self, kind: str, q: Question, turn: int) -> JudgePrompt:
        ref = self.refs.get(q.question_id)
        with_ref = q.category in NEED_REF_CATS and ref is not None and len(ref) >= turn
        if kind == "vicuna":  # the seed's review prompts have no reference; use one if the prompt file has it
            with_ref = with_ref and any(p.kind == "vicuna" and p.with_ref for p in self.prompts)
        return pick_prompt(self.prompts, kind, q.category, multi_turn=turn > 1, with_ref=with_ref, source=self.source)

    def values(self, prompt: JudgePrompt, q: Question, turn: int, answers: dict[str, list[str]]) -> dict[str, str]:
        """Template values: question(s), reference(s) and each side's answer(s) under its placeholder suffix."""
        v: dict[str, str] = {}
        if prompt.multi_turn:
            for i in range(turn):
                v[f"question_{i + 1}"] = q.turns[i]
                for suffix, turns in answers.items():
                    v[f"answer{suffix}_{i + 1}"] = turns[i]
        else:
            v["question"] = q.turns[turn - 1]
            for suffix, turns in answers.items():
                v[f"answer{suffix}"] = turns[turn - 1]
        if prompt.with_ref:
            for i, r in enumerate(self.refs[q.question_id][:turn]):
                v[f"ref_answer_{i + 1}"] = r
        return v

    async def ask(self, prompt: JudgePrompt, values: dict[str, str], parse: Callable[[str], Any]) -> tuple[Any, str, str | None]:
        """(parsed verdict, reply, error); an unparseable reply counts as a failed attempt."""
        messages = prompt.messages(**values)
        last = {"text": ""}

        async def call():
            text = await chat(self.client, self.judge_model, messages, self.temperature, self.max_tokens)
            last["text"] = text
            parsed = parse(text)
            if parsed is None:
                raise Unusable(f"unparseable judgment: ...{text[-200:]!r}")
            return parsed, text

        result, error, attempts = await with_retries(call, self.policy)
        if error is not None:
            return None, last["text"], f"{error} (after {attempts} attempts)"
        return result[0], result[1], None

    async def judge(self, unit: Unit) -> dict:
        q, turn = unit.question, unit.turn
        base = {"question_id": q.question_id, "category": q.category, "turn": turn, "tstamp": time.time()}
        if self.mode == "vicuna":
            model, baseline = unit.models
            p = self.prompt_for("vicuna", q, 1)
            mine, theirs = self.turns(model, q), self.turns(baseline, q)
            g1 = self.ask(p, self.values(p, q, 1, {"_1": mine, "_2": theirs}), parse_pair_scores)
            g2 = self.ask(p, self.values(p, q, 1, {"_1": theirs, "_2": mine}), parse_pair_scores)
            (s1, j1, e1), (s2, j2, e2) = await asyncio.gather(g1, g2)
            rec = {"mode": "vicuna", **base, "model": model, "baseline": baseline, "judge": [self.judge_model, p.name],
                   "g1_scores": list(s1) if s1 else None, "g1_judgment": j1,
                   "g2_scores": list(s2) if s2 else None, "g2_judgment": j2}
            if e1 or e2:
                return {**rec, "model_score": None, "baseline_score": None,
                        "error": "; ".join(f"order {i}: {e}" for i, e in ((1, e1), (2, e2)) if e)}
            # Position calibration: map each order back to the model's side and average.
            return {**rec, "model_score": (s1[0] + s2[1]) / 2, "baseline_score": (s1[1] + s2[0]) / 2, "error": None}
        if self.mode == "single":
            (model,) = unit.models
            p = self.prompt_for("single", q, turn)
            score, text, err = await self.ask(p, self.values(p, q, turn, {"": self.turns(model, q)}), parse_rating)
            # FastChat's convention: score -1 marks a judgment that could not be parsed (its readers skip it).
            return {"mode": "single", **base, "model": model, "judge": [self.judge_model, p.name],
                    "judgment": text, "score": -1 if err else score, "error": err}
        m1, m2 = unit.models
        p = self.prompt_for("pairwise", q, turn)
        a1, a2 = self.turns(m1, q), self.turns(m2, q)
        g1 = self.ask(p, self.values(p, q, turn, {"_a": a1, "_b": a2}), parse_verdict)
        g2 = self.ask(p, self.values(p, q, turn, {"_a": a2, "_b": a1}), parse_verdict)
        (v1, j1, e1), (v2, j2, e2) = await asyncio.gather(g1, g2)
        w1 = {"A": "model_1", "B": "model_2", "tie": "tie"}.get(v1, "error")
        w2 = {"A": "model_2", "B": "model_1", "tie": "tie"}.get(v2, "error")  # game 2 shows model_2 as A
        rec = {"mode": "pairwise", **base, "model_1": m1, "model_2": m2, "judge": [self.judge_model, p.name],
               "baseline": m2 if self.mode == "pairwise-baseline" else None,
               "g1_winner": w1, "g1_judgment": j1, "g2_winner": w2, "g2_judgment": j2}
        if e1 or e2:
            return {**rec, "winner": None, "error": "; ".join(f"order {i}: {e}" for i, e in ((1, e1), (2, e2)) if e)}
        return {**rec, "winner": w1 if w1 == w2 else "tie", "error": None}  # disagreement is a tie


def default_out(answers_dir: Path, judge_model: str, mode: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", judge_model)
    suffix = {"vicuna": "vicuna", "single": "single", "pairwise-baseline": "pair", "pairwise-all": "pair-all"}[mode]
    return answers_dir.parent / "model_judgment" / f"{safe}_{suffix}.jsonl"


@dataclass
class JudgeSummary:
    judged: int     # new judgments
    resumed: int    # already in the judgment file
    failed: int     # judged again on the next run
    out: str


async def judge_all(units: list[Unit], judge: Judge, out: Path, parallel: int) -> JudgeSummary:
    done: dict[tuple, dict] = {}
    if out.exists():
        for rec in read_jsonl(out, tolerate_torn_tail=True):
            if rec.get("error") is None and rec.get("mode"):
                done[unit_key(rec)] = rec  # failed units are judged again
    write_jsonl(out, sorted(done.values(), key=lambda r: (sort_key(r["question_id"]), str(unit_key(r)))))
    todo = [u for u in units if u.key not in done]
    failed = []

    async def work(unit: Unit) -> None:
        rec = await judge.judge(unit)
        if rec["error"] is not None:
            failed.append(rec)
        append_jsonl(out, rec)

    try:
        await run_parallel(todo, work, parallel, desc=f"judge {judge.mode}")
    finally:
        await judge.client.close()
        rows = read_jsonl(out, tolerate_torn_tail=True)
        write_jsonl(out, sorted(rows, key=lambda r: (sort_key(r["question_id"]), str(unit_key(r)))))
    return JudgeSummary(len(todo) - len(failed), sum(u.key in done for u in units), len(failed), str(out))


def run_judge(mode: str, bench: str, answers_dir: str, judge_model: str, judge_api_base: str | None = None,
              baseline: str | None = None, models: list[str] | None = None, prompts: str | None = None,
              references: str | None = None, out: str | None = None, parallel: int = 8, temperature: float = 0.0,
              max_tokens: int = 2048, retries: int = 4, backoff: float = 1.0,
              console: Console | None = None) -> JudgeSummary:
    console = console or Console(stderr=True)
    if mode not in MODES:
        raise OchatError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    questions = load_questions(bench)
    answers = load_answer_dir(answers_dir)
    if mode in ("vicuna", "pairwise-baseline"):
        if not baseline:
            raise OchatError(f"--mode {mode} needs --baseline NAME (one of: {', '.join(answers)})")
        if baseline not in answers:
            raise OchatError(f"--baseline {baseline}: no {baseline}.jsonl in {answers_dir} (found: {', '.join(answers)})")
    chosen = [m for m in (models or answers) if not (mode in ("vicuna", "pairwise-baseline") and m == baseline)]
    for m in chosen:
        if m not in answers:
            raise OchatError(f"--models {m}: no {m}.jsonl in {answers_dir} (found: {', '.join(answers)})")
    if mode == "pairwise-all" and len(chosen) < 2:
        raise OchatError(f"--mode pairwise-all needs at least two models in {answers_dir}")
    if not chosen:
        raise OchatError(f"{answers_dir}: no model to judge besides the baseline {baseline}")
    judge_prompts = load_prompts(prompts, mode)
    refs = load_references(references, questions)
    units = plan_units(mode, questions, answers, chosen, baseline, console)
    out_path = Path(out) if out else default_out(Path(answers_dir), judge_model, mode)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    judge = Judge(mode, judge_prompts, answers, refs, make_client(judge_api_base), judge_model, temperature, max_tokens,
                  RetryPolicy(attempts=retries, backoff=backoff), prompts or "default prompts")
    for u in units:  # fail on a missing prompt before spending any judge calls
        judge.prompt_for({"vicuna": "vicuna", "single": "single"}.get(mode, "pairwise"), u.question, u.turn)
    return asyncio.run(judge_all(units, judge, out_path, parallel))
