"""Deterministic train/eval split by conversation group.

The eval set is `round(n * eval_ratio)` groups (at least one when the ratio is positive and there
are two or more groups) drawn with `random.Random(seed)` from the sorted group ids, so the same
input, ratio and seed always give the same split whatever the order of the files. A group is the
original conversation: the pieces `fit --mode split` makes of one long conversation stay together,
so no eval conversation leaks into training.
"""

from __future__ import annotations

import random
from typing import Iterable

from ochat.errors import OchatError


def eval_count(n: int, eval_ratio: float) -> int:
    if not 0.0 <= eval_ratio < 1.0:
        raise OchatError(f"--eval-ratio {eval_ratio}: expected a number in [0, 1)")
    if eval_ratio == 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * eval_ratio)))


def choose_eval_groups(groups: Iterable[str], eval_ratio: float, seed: int) -> set[str]:
    unique = sorted(set(groups))
    k = eval_count(len(unique), eval_ratio)
    return set(random.Random(seed).sample(unique, k)) if k else set()
