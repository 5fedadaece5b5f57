"""Token rows for throughput benchmarks where the content does not matter (`ochat bench train`):
conversation lengths shaped like ShareGPT (log-normal, long tail, capped), filled with random ids."""

from __future__ import annotations

import numpy as np


def sharegpt_like_lengths(n: int, seed: int = 0, median: int = 300, sigma: float = 0.9, min_len: int = 16,
                          max_len: int = 2048) -> np.ndarray:
    """Log-normal lengths (ShareGPT: median a few hundred tokens, a long tail up to the context)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), min_len, max_len).astype(np.int64)


def random_token_rows(lengths: np.ndarray, vocab_size: int, seed: int = 0,
                      prompt_fraction: float = 0.3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random token ids with the first `prompt_fraction` of each row unsupervised (weight 0)."""
    rng = np.random.default_rng(seed)
    tokens, weights = [], []
    for n in lengths:
        tokens.append(rng.integers(3, vocab_size, int(n)).astype(np.int32))
        w = np.ones(int(n), dtype=np.float32)
        w[:max(1, int(n * prompt_fraction))] = 0.0
        weights.append(w)
    return tokens, weights
