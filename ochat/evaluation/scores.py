"""Scores from judgment records: relative score, MT-bench means, win rates, each with a standard error.

Failed judgments (`"error"` set) are counted, never scored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def ratio_se(model: list[float], base: list[float]) -> tuple[float, float]:
    """sum(model) / sum(base) and its standard error (delta method for a ratio of means)."""
    n = len(model)
    if n == 0 or sum(base) == 0:
        return math.nan, math.nan
    r = sum(model) / sum(base)
    if n == 1:
        return r, math.nan
    mean_b = sum(base) / n
    resid = sum((m - r * b) ** 2 for m, b in zip(model, base)) / (n - 1)
    return r, math.sqrt(resid / n) / mean_b


def record_mode(rec: dict) -> str:
    """Our records carry "mode"; FastChat's own judgment files are recognised by their fields."""
    if rec.get("mode"):
        return rec["mode"]
    if "g1_winner" in rec:
        return "pairwise"
    if "score" in rec:
        return "single"
    return "unknown"


def is_failed(rec: dict) -> bool:
    mode = record_mode(rec)
    if rec.get("error"):
        return True
    if mode == "single":
        return rec.get("score") is None or rec.get("score") == -1  # FastChat writes -1 when it cannot parse
    if mode == "pairwise":
        return "error" in (rec.get("g1_winner"), rec.get("g2_winner"))
    if mode == "vicuna":
        return rec.get("model_score") is None
    return True


def vicuna_scores(records: Iterable[dict]) -> dict[str, dict]:
    """Per model: relative score sum(model)/sum(baseline) x 100 with SE, overall and per category."""
    by_model: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, int] = defaultdict(int)
    baseline = {}
    for r in records:
        if is_failed(r):
            failed[r["model"]] += 1
            continue
        baseline[r["model"]] = r["baseline"]
        for cat in ("__all__", r.get("category", "general")):
            by_model[r["model"]][cat].append((r["model_score"], r["baseline_score"]))
    out = {}
    for model in sorted(set(by_model) | set(failed)):
        cats = {}
        for cat, pairs in by_model[model].items():
            ms, bs = [p[0] for p in pairs], [p[1] for p in pairs]
            rel, se = ratio_se(ms, bs)
            cats[cat] = {"score": 100 * rel, "se": 100 * se, "n": len(pairs),
                         "model_mean": sum(ms) / len(ms), "baseline_mean": sum(bs) / len(bs)}
        overall = cats.pop("__all__", {"score": math.nan, "se": math.nan, "n": 0})
        out[model] = {"overall": overall, "categories": dict(sorted(cats.items())), "failed": failed[model],
                      "baseline": baseline.get(model)}
    return out


def single_scores(records: Iterable[dict]) -> dict[str, dict]:
    """Per model: mean 1-10 rating with SE overall, per turn and per category."""
    vals: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, int] = defaultdict(int)
    for r in records:
        if is_failed(r):
            failed[r["model"]] += 1
            continue
        for key in ("__all__", f"turn {r.get('turn', 1)}", "cat:" + str(r.get("category", "general"))):
            vals[r["model"]][key].append(float(r["score"]))
    out = {}
    for model in sorted(set(vals) | set(failed)):
        stats = {k: dict(zip(("score", "se"), mean_se(v)), n=len(v)) for k, v in vals[model].items()}
        out[model] = {"overall": stats.pop("__all__", {"score": math.nan, "se": math.nan, "n": 0}),
                      "turns": {k: v for k, v in sorted(stats.items()) if k.startswith("turn")},
                      "categories": {k[4:]: v for k, v in sorted(stats.items()) if k.startswith("cat:")},
                      "failed": failed[model]}
    return out


def _outcomes(records: Iterable[dict], failed: dict[str, int]) -> dict[str, dict[str, list]]:
    """Per model and category: 1 (win), 0.5 (tie), 0 (loss) for each game it played."""
    res: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        m1, m2 = r["model_1"], r["model_2"]
        if is_failed(r):
            failed[m1] += 1
            failed[m2] += 1
            continue
        winner = r.get("winner")
        if winner is None:  # FastChat's files: both orders, disagreement is a tie
            g1, g2 = r["g1_winner"], r["g2_winner"]
            winner = g1 if g1 == g2 else "tie"
        v1 = {"model_1": 1.0, "model_2": 0.0, "tie": 0.5}[winner]
        for cat in ("__all__", str(r.get("category", "general"))):
            res[m1][cat].append(v1)
            res[m2][cat].append(1.0 - v1)
    return res


def _win_stats(v: list[float]) -> dict[str, Any]:
    n = len(v)
    wins, losses, ties = v.count(1.0), v.count(0.0), v.count(0.5)
    rate, se = mean_se(v)
    def frac(k: int) -> tuple[float, float]:
        if n == 0:
            return math.nan, math.nan
        return k / n, math.sqrt(k / n * (1 - k / n) / n) if n > 1 else math.nan
    (wr, wse), (lr, lse) = frac(wins), frac(losses)
    return {"win": wins, "loss": losses, "tie": ties, "total": n, "win_rate": wr, "win_se": wse,
            "loss_rate": lr, "loss_se": lse, "score": rate, "se": se}


def pairwise_scores(records: Iterable[dict], baseline: str | None = None) -> dict[str, dict]:
    """Per model: wins, losses, ties and (win + tie/2) / total with SE (AlpacaEval's board), per category too.

    With `baseline`, only games against it count and the baseline itself is not listed."""
    records = [r for r in records if baseline is None or baseline in (r["model_1"], r["model_2"])]
    failed: dict[str, int] = defaultdict(int)
    res = _outcomes(records, failed)
    out = {}
    for model in sorted(set(res) | set(failed)):
        if model == baseline:
            continue
        cats = {c: _win_stats(v) for c, v in res[model].items()}
        out[model] = {"overall": cats.pop("__all__", None) or _win_stats([]),
                      "categories": dict(sorted(cats.items())), "failed": failed[model], "baseline": baseline}
    return out
