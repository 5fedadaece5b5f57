"""Votes from the compare view -> win rates and a Bradley-Terry ranking with bootstrap intervals."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from ochat.cli import main
from ochat.evaluation.votes import PRIOR_C, _outcome_table, append_vote, bradley_terry, load_votes, ranking, vote_record

STRENGTH = {"strong": 1.5, "middle": 0.5, "weak": -0.5}     # log-odds; 1.0 = 174 Elo points


def simulated_votes(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    votes = []
    for _ in range(n):
        a, b = rng.sample(sorted(STRENGTH), 2)
        p = 1 / (1 + math.exp(-(STRENGTH[a] - STRENGTH[b])))
        winner = "tie" if rng.random() < 0.15 else ("model_1" if rng.random() < p else "model_2")
        votes.append(vote_record(a, b, winner, [{"role": "user", "content": "hi"}], "x", "y"))
    return votes


def test_ranking_recovers_the_order_and_matches_sklearn():
    votes = simulated_votes(600)
    rows = ranking(votes, rounds=300)
    assert [r["model"] for r in rows] == ["strong", "middle", "weak"]
    for r in rows:
        assert r["ci_low"] <= r["rating"] <= r["ci_high"]
        assert r["wins"] + r["losses"] + r["ties"] == r["games"]
    assert sum(r["games"] for r in rows) == 2 * len(votes)
    gap = rows[0]["rating"] - rows[2]["rating"]     # true gap: 2 log-odds = 347 points (ties shrink it a bit)
    assert 200 < gap < 450, gap
    # The same penalised likelihood fitted by sklearn's logistic regression (Chatbot Arena's way).
    from sklearn.linear_model import LogisticRegression

    models = sorted(STRENGTH)
    X, outcome, counts = _outcome_table(votes, models)
    lr = LogisticRegression(fit_intercept=False, C=PRIOR_C, tol=1e-10, max_iter=10_000)
    lr.fit(np.vstack([X, X]), np.r_[np.ones(len(X)), np.zeros(len(X))], sample_weight=np.r_[counts * outcome,
                                                                                            counts * (1 - outcome)])
    beta = lr.coef_[0]
    expected = 1000 + 400 / math.log(10) * (beta - beta.mean())
    np.testing.assert_allclose(bradley_terry(X, outcome, counts), expected, atol=1e-3)


def test_one_sided_and_tied_votes_stay_finite():
    rows = ranking([vote_record("a", "b", "model_1")] * 5, rounds=50)
    assert rows[0]["model"] == "a" and all(math.isfinite(r["rating"]) for r in rows)
    tied = ranking([vote_record("a", "b", "tie")] * 4, rounds=50)
    assert all(abs(r["rating"] - 1000) < 1e-6 for r in tied)
    with pytest.raises(ValueError):
        vote_record("a", "a", "model_1")
    with pytest.raises(ValueError):
        vote_record("a", "b", "both")


def test_ranking_command_reads_a_votes_file(tmp_path, capsys):
    path = tmp_path / "votes.jsonl"
    for v in simulated_votes(120, seed=3):
        append_vote(path, v)
    with open(path, "a") as f:
        f.write('{"model_1": "strong", "model_2": "strong", "winner": "model_1"}\n{"model_1": "weak", "mod')
    votes, skipped = load_votes(path)
    assert (len(votes), skipped) == (120, 1)       # the torn last line is dropped, the bad one counted
    out = tmp_path / "ranking.json"
    assert main(["eval", "ranking", str(path), "--out", str(out), "--rounds", "100"]) == 0
    report = json.loads(out.read_text())
    assert report["votes"] == 120 and report["skipped"] == 1
    assert [r["model"] for r in report["ranking"]][0] == "strong"
    printed = capsys.readouterr().out
    assert "Bradley-Terry" in printed and "strong" in printed
    assert main(["eval", "ranking", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
