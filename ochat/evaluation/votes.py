"""Human votes from the web chat's compare view, and the ranking they give (`ochat eval ranking VOTES`).

A votes file is JSON lines, one vote per line, appended by the server (`ochat serve --votes-file`):

    {"mode": "pairwise", "judge": "human", "model_1": "mine", "model_2": "base", "winner": "model_1",
     "messages": [...], "answer_1": "...", "answer_2": "...", "time": 1764620000.0, "id": "vote-..."}

`winner` is "model_1", "model_2" or "tie", the same fields as a pairwise judgment, so win rates come from
`ochat.evaluation.scores.pairwise_scores` and `ochat eval report` reads a votes file like a judgment file.
The ranking is a Bradley-Terry model on the Elo scale (Chatbot Arena's), fitted by logistic regression,
with percentile confidence intervals from a bootstrap over the votes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ochat.errors import OchatError
from ochat.evaluation.files import read_jsonl
from ochat.evaluation.scores import pairwise_scores
from ochat.serving.votes import WINNERS, append_vote, vote_record  # noqa: F401 (the record the server writes)

ELO_SCALE, ELO_BASE, ELO_INIT = 400.0, 10.0, 1000.0
# L2 prior on the log-strengths (sklearn's C): keeps a model that never lost finite on few votes; at
# C = 10 it is worth well under one game against each opponent, so it vanishes as votes accumulate.
PRIOR_C = 10.0


def load_votes(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The valid votes of a votes file and how many lines were skipped as malformed."""
    votes, skipped = [], 0
    for r in read_jsonl(path, tolerate_torn_tail=True):
        ok = (isinstance(r.get("model_1"), str) and isinstance(r.get("model_2"), str) and r["model_1"]
              and r["model_2"] and r["model_1"] != r["model_2"] and r.get("winner") in WINNERS)
        if ok:
            votes.append(r)
        else:
            skipped += 1
    return votes, skipped


def _outcome_table(votes: list[dict], models: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The votes grouped by (model_1, model_2, outcome): logistic-regression rows (+1 for model_1, -1 for
    model_2), the label "model_1 won" and the count. A tie is half a win for each side (two rows of half
    weight), as Chatbot Arena counts it. Fitting on counts, not votes, keeps the bootstrap fast."""
    index = {m: i for i, m in enumerate(models)}
    counts: dict[tuple[int, int, str], int] = {}
    for v in votes:
        key = (index[v["model_1"]], index[v["model_2"]], v["winner"])
        counts[key] = counts.get(key, 0) + 1
    keys = list(counts)
    X = np.zeros((len(keys), len(models)))
    for row, (i, j, _) in enumerate(keys):
        X[row, i], X[row, j] = 1.0, -1.0
    outcome = np.array([{"model_1": 1.0, "model_2": 0.0, "tie": 0.5}[k[2]] for k in keys])
    return X, outcome, np.array([counts[k] for k in keys], dtype=float)


def bradley_terry(X: np.ndarray, outcome: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Elo-scale ratings (mean 1000), one per column of X; 400 points = 10:1 odds of winning.

    The maximum of the L2-penalised (prior `PRIOR_C`) Bradley-Terry likelihood, by Newton's method: a
    strictly concave problem in a handful of parameters, solved in a few iterations. (sklearn's
    LogisticRegression gives the same numbers but spends ~50 ms per fit in overhead, and the bootstrap
    fits hundreds of times.)"""
    wins, games = counts * outcome, counts
    beta = np.zeros(X.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (games * p - wins) + beta / PRIOR_C
        hess = (X.T * (games * p * (1 - p))) @ X + np.eye(len(beta)) / PRIOR_C
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return ELO_INIT + ELO_SCALE / math.log(ELO_BASE) * (beta - beta.mean())


def ranking(votes: list[dict], rounds: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per model, best first: rating, its bootstrap confidence interval (votes resampled with replacement:
    a multinomial draw over the outcome table), games, wins, losses, ties and win rate (wins + ties/2) /
    games with its standard error."""
    if not votes:
        raise OchatError("no votes to rank")
    models = sorted({m for v in votes for m in (v["model_1"], v["model_2"])})
    if len(models) < 2:
        raise OchatError("the votes name fewer than two models")
    X, outcome, counts = _outcome_table(votes, models)
    ratings = bradley_terry(X, outcome, counts)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(votes), counts / counts.sum(), size=rounds)
    boot = np.array([bradley_terry(X, outcome, d.astype(float)) for d in draws]) if rounds else None
    if boot is None:
        lo = hi = np.full(len(models), np.nan)
    else:
        lo, hi = np.percentile(boot, [50 * (1 - confidence), 50 * (1 + confidence)], axis=0)
    wins = pairwise_scores(votes)
    rows = []
    for i, m in enumerate(models):
        w = wins[m]["overall"]
        rows.append({"model": m, "rating": float(ratings[i]), "ci_low": _finite(lo[i]), "ci_high": _finite(hi[i]),
                     "games": w["total"], "wins": w["win"], "losses": w["loss"], "ties": w["tie"],
                     "win_rate": _finite(w["score"]), "win_rate_se": _finite(w["se"])})
    rows.sort(key=lambda r: -r["rating"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def _finite(x: float) -> float | None:
    """NaN (no interval, one game) as None: the ranking is written as strict JSON."""
    return None if math.isnan(x) else float(x)


def print_ranking(path: str | os.PathLike, rows: list[dict], skipped: int, confidence: float, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    n = sum(r["games"] for r in rows) // 2
    table = Table(title=f"{Path(path).name}: Bradley-Terry ranking of {n} votes (Elo scale, "
                        f"{round(confidence * 100)}% bootstrap CI)")
    for h in ("rank", "model", "rating", "CI", "games", "wins", "losses", "ties", "win rate ± SE"):
        table.add_column(h, justify="left" if h == "model" else "right")

    def pct(x: float) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"

    for r in rows:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.0f} .. {r['ci_high']:.0f}"
        table.add_row(str(r["rank"]), r["model"], f"{r['rating']:.0f}", ci, str(r["games"]), str(r["wins"]),
                      str(r["losses"]), str(r["ties"]), f"{pct(r['win_rate'])} ± {pct(r['win_rate_se'])}%")
    console.print(table)
    if skipped:
        console.print(f"[yellow]{skipped} malformed line(s) skipped[/]")
