"""What a data run did, as data: conversations in and out per step, drops by reason (with examples
and a JSONL log of every one), repairs. The CLI renders it (`render`); runs return it as a dict."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import ochat

EXAMPLES_PER_REASON = 5


class Report:
    """Counts per step. Every drop is also appended to a JSONL log (`step`, `reason`, `where`, `id`, `detail`)."""

    def __init__(self, steps: tuple[str, ...] = (), drop_log: Path | None = None):
        self.steps: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}
        # a file name that is not UTF-8 (surrogate-escaped) must not stop the log
        self._log = open(drop_log, "w", encoding="utf-8", errors="backslashreplace") if drop_log else None
        for name in steps:
            self.step(name)

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.setdefault(name, {"in": 0, "out": 0, "dropped": Counter(), "fixed": Counter(),
                                            "notes": Counter(), "examples": {}})

    def drop(self, step: str, reason: str, where: str, id: str = "", detail: str = "") -> None:
        s = self.step(step)
        s["dropped"][reason] += 1
        ex = s["examples"].setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append({"where": where, "id": id, "detail": detail})
        if self._log:
            self._log.write(json.dumps({"step": step, "reason": reason, "where": where, "id": id,
                                        "detail": detail}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def to_dict(self) -> dict[str, Any]:
        steps = {name: {"in": s["in"], "out": s["out"], "dropped": dict(s["dropped"]),
                        "dropped_total": sum(s["dropped"].values()), "fixed": dict(s["fixed"]),
                        "notes": dict(s["notes"]), "examples": s["examples"],
                        "cpu_seconds": round(s.get("cpu_seconds", 0.0), 3)}
                 for name, s in self.steps.items()}
        return {"ochat_version": ochat.__version__, **self.info, "steps": steps}


def render(report: dict[str, Any], file: TextIO | None = None) -> None:
    """The report as a table: each step's counts, then its drops (with an example), repairs and notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="ochat data: conversations per step")
    for col in ("step", "in", "out", "dropped / fixed", "count", "example"):
        table.add_column(col, overflow="fold")
    for name, s in report["steps"].items():
        table.add_row(name, str(s["in"]), str(s["out"]), "", "", "", style="bold")
        for reason, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1]):
            ex = (s["examples"].get(reason) or [{}])[0]
            table.add_row("", "", "", reason, str(n), escape(f"{ex.get('where', '')} {ex.get('detail', '')}".strip()))
        for fix, n in sorted(s["fixed"].items(), key=lambda kv: -kv[1]):
            table.add_row("", "", "", f"(fixed) {fix}", str(n), "")
        for note, n in sorted(s["notes"].items(), key=lambda kv: -kv[1]):
            table.add_row("", "", "", f"(note) {note}", str(n), "")
    Console(file=file or sys.stderr, width=140).print(table)
    for line in report.get("summary", []):
        print(line, file=file or sys.stderr)


def nothing_kept_hint(report: dict[str, Any]) -> str:
    """Why a run kept no conversation, and the flag that would keep them (for the error message)."""
    steps = report["steps"]
    why = [f"{name}: {', '.join(f'{n} {r}' for r, n in sorted(s['dropped'].items(), key=lambda kv: -kv[1]))}"
           for name, s in steps.items() if s["dropped"]]
    hint = ""
    filt = steps.get("filter", {}).get("dropped", {})
    if filt.get("no_model_label") or filt.get("model_not_selected") or filt.get("model_not_in_condition_map"):
        hint = (" The model filter dropped them: pass --models any to keep every conversation, or add "
                "'*=CONDITION:WEIGHT' to --condition-map for unlabelled and other models.")
    elif steps.get("read", {}).get("in", 0) == 0:
        hint = " No conversation was found in the inputs."
    return f"kept 0 conversations ({'; '.join(why) or 'nothing read'}).{hint}"
