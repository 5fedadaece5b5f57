"""Multipack sampler: conversations -> bins of at most `batch_max_len` tokens, `bins_per_step` bins a step.

Each epoch the conversation indices are shuffled with (seed, epoch); a window of them is packed with
first-fit-decreasing (longest first, each into the first bin with room), which fills bins to ~99% on
chat length distributions. Bins are grouped into optimiser steps of `bins_per_step` bins (world size x
gradient accumulation); bins that do not fill a whole step go back into the pool for the next window,
and the last incomplete step of an epoch is dropped (its conversations come back, shuffled elsewhere,
next epoch). Finally the epoch's steps are shuffled (same seed and epoch): first-fit-decreasing makes
bins longest-first, and emitting them in that order would be a length curriculum (all the long
conversations first in each window) that nobody asked for. The result depends only on (lengths,
batch_max_len, bins_per_step, seed, epoch, window), never on the world size, so N ranks x 1 bin and
1 rank x N bins see the same global batch.
"""

from __future__ import annotations

import numpy as np


def first_fit_decreasing(lengths: np.ndarray, indices: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack `indices` (into `lengths`) into bins of `capacity` tokens. Bins come out in creation order."""
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        # Linear scan is fine: a window makes a few hundred bins at most.
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(int(i))
                room[b] = r - n
                break
        else:
            bins.append([int(i)])
            room.append(capacity - n)
    return bins


class MultipackSampler:
    def __init__(self, lengths: np.ndarray | list[int], batch_max_len: int, bins_per_step: int = 1,
                 seed: int = 0, window: int = 4096):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and int(self.lengths.max()) > batch_max_len:
            raise ValueError(f"a conversation has {int(self.lengths.max())} tokens > batch_max_len "
                             f"{batch_max_len} (truncate first)")
        self.batch_max_len = batch_max_len
        self.bins_per_step = bins_per_step
        self.seed = seed
        self.window = window
        self._cache: dict[int, list[list[list[int]]]] = {}

    def steps(self, epoch: int) -> list[list[list[int]]]:
        """All steps of an epoch: steps[s][b] is the list of conversation indices in bin b of step s."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        steps: list[list[list[int]]] = []
        carry = np.empty(0, dtype=np.int64)
        for start in range(0, len(order), self.window):
            pool = np.concatenate([carry, order[start:start + self.window]])
            bins = first_fit_decreasing(self.lengths, pool, self.batch_max_len)
            # Fullest bins first into steps; the emptiest leftovers wait for the next window.
            n_full = len(bins) // self.bins_per_step * self.bins_per_step
            kept, rest = bins[:n_full], bins[n_full:]
            for s in range(0, n_full, self.bins_per_step):
                steps.append(kept[s:s + self.bins_per_step])
            carry = np.array([i for b in rest for i in b], dtype=np.int64)
        steps = [steps[i] for i in rng.permutation(len(steps))]
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[epoch] = steps
        return steps

    def num_steps(self, epoch: int) -> int:
        return len(self.steps(epoch))

    def efficiency(self, epoch: int) -> float:
        """Real tokens / bin capacity over the epoch's steps (1.0 = no empty slot)."""
        steps = self.steps(epoch)
        used = sum(int(self.lengths[i]) for step in steps for b in step for i in b)
        capacity = sum(len(step) for step in steps) * self.batch_max_len
        return used / capacity if capacity else 0.0

    def dropped(self, epoch: int) -> int:
        """Conversations left out of this epoch (the last incomplete step)."""
        return len(self.lengths) - sum(len(b) for step in self.steps(epoch) for b in step)
