"""Judge prompts are data: FastChat's `judge_prompts.jsonl` format, loaded from a path.

A line: {"name", "type": "single"|"pairwise"|"pairwise-score", "system_prompt", "prompt_template",
"category", "output_format"}. The seed's Vicuna review prompts (`{"prompt_id", "prompt_template",
"defaults": {"prompt": ...}, "category"}`) load too. Which prompt judges what is decided by the
placeholders the template uses, so any file in these formats works with every mode.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from ochat.errors import OchatError
from ochat.evaluation.files import read_jsonl

DEFAULT_DIR = Path(__file__).parent / "prompts"
# MT-bench judges these categories against a reference answer (FastChat's NEED_REF_CATS).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")


@dataclass
class JudgePrompt:
    name: str
    type: str
    system_prompt: str
    prompt_template: str
    category: str = "general"
    defaults: dict = field(default_factory=dict)

    @property
    def fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f}

    @property
    def kind(self) -> str:
        """vicuna (two scores), pairwise ([[A]]/[[B]]/[[C]]) or single ([[rating]])."""
        if self.type in ("single", "pairwise"):
            return self.type
        f = self.fields
        if self.type == "pairwise-score" or {"question", "answer_1", "answer_2"} <= f:  # the seed's review prompts
            return "vicuna"
        return "pairwise" if any(x.startswith("answer_a") for x in f) else "single"

    @property
    def multi_turn(self) -> bool:
        return "question_2" in self.fields

    @property
    def with_ref(self) -> bool:
        return "ref_answer_1" in self.fields

    def messages(self, **values: str) -> list[dict]:
        missing = self.fields - values.keys() - self.defaults.keys()
        if missing:
            raise OchatError(f"judge prompt {self.name!r}: no value for {sorted(missing)}")
        user = self.prompt_template.format(**{**self.defaults, **values})
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": user}]


def load_prompts(path: str | os.PathLike | None, mode: str) -> list[JudgePrompt]:
    """The prompts in `path` (FastChat format) or ochat's defaults for the mode."""
    files = [Path(path)] if path else [DEFAULT_DIR / ("vicuna.jsonl" if mode == "vicuna" else "mt_bench.jsonl")]
    prompts = []
    for p in files:
        for i, row in enumerate(read_jsonl(p), 1):
            if not isinstance(row.get("prompt_template"), str):
                raise OchatError(f"{p}:{i}: missing string field 'prompt_template'")
            defaults = row.get("defaults") or {}
            if not isinstance(defaults, dict):
                raise OchatError(f"{p}:{i}: field 'defaults' must be an object")
            try:
                list(string.Formatter().parse(row["prompt_template"]))
            except ValueError as e:
                raise OchatError(f"{p}:{i}: prompt_template is not a valid format string ({e})") from None
            prompts.append(JudgePrompt(name=str(row.get("name", row.get("prompt_id", i))), type=str(row.get("type", "")),
                                       system_prompt=str(row.get("system_prompt", "")),
                                       prompt_template=row["prompt_template"],
                                       category=str(row.get("category", "general")), defaults=defaults))
    return prompts


def pick_prompt(prompts: list[JudgePrompt], kind: str, category: str, multi_turn: bool = False,
                with_ref: bool = False, source: str = "prompts") -> JudgePrompt:
    """The prompt for one judgment; a category-specific prompt wins over the general one."""
    fits = [p for p in prompts if p.kind == kind and p.multi_turn == multi_turn and p.with_ref == with_ref]
    if not fits:
        what = f"{kind}{' multi-turn' if multi_turn else ''}{' with reference' if with_ref else ''}"
        raise OchatError(f"{source}: no {what} judge prompt (see ochat/evaluation/prompts/ for the format)")
    for want in (category, "general"):
        for p in fits:
            if p.category == want:
                return p
    return fits[0]


# --- parsing the judge's reply (evidence first, verdict last) ---------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
_PAIR_LINE = re.compile(rf"^\W*?\[?\s*(?:score[s]?\s*:?\s*)?{_NUM}\s*(?:,|\s|/|and)\s*{_NUM}\s*\]?\W*$", re.I)
_RATING = re.compile(rf"\[\[\s*{_NUM}\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_pair_scores(text: str) -> tuple[float, float] | None:
    """Two scores on the last non-empty line (the evidence-calibrated format), each within 0..10."""
    lines = [ln.strip().strip("`*").strip() for ln in text.strip().splitlines() if ln.strip().strip("`*").strip()]
    if not lines:
        return None
    m = _PAIR_LINE.match(lines[-1])
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def parse_rating(text: str) -> float | None:
    """The last `[[N]]` in the reply, within 1..10."""
    found = _RATING.findall(text)
    if not found:
        return None
    r = float(found[-1])
    return r if 1 <= r <= 10 else None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from the last `[[A]]`/`[[B]]`/`[[C]]` in the reply."""
    found = _VERDICT.findall(text)
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]
