"""One packed row: several conversations side by side, no padding, no attention mask.

Position ids restart at 0 for every conversation. In transformers 5.x, `masking_utils.
_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)` only when the attention
mask is None *and* there is no KV cache (hence `use_cache=False` on every training forward: with the
config's default `use_cache=True` the model creates a DynamicCache and the detection is skipped);
`packed_sequence_compatibility_function` then ANDs the causal mask with "same sequence" for sdpa /
eager / flex attention. FlashAttention-2/3 derive varlen `cu_seqlens` from the same position ids.
So attention never crosses a conversation boundary (tests/test_training_packing.py checks the losses).

Labels are shifted inside each conversation (token t predicts token t+1 of the same conversation);
the last token of a conversation predicts nothing (weight 0). A token's loss weight is the weight of
the token it predicts, as written by the data pipeline (0 for prompts, the C-RLFT class weight for
answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE = -100  # torch cross-entropy's ignore_index


@dataclass
class PackedBatch:
    input_ids: torch.Tensor     # [1, L] int64
    position_ids: torch.Tensor  # [1, L] int64, restarting at 0 per conversation
    labels: torch.Tensor        # [1, L] int64, next token of the same conversation or IGNORE
    weights: torch.Tensor       # [1, L] float32, loss weight of each label (0 where IGNORE)
    num_conversations: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.position_ids.to(device, non_blocking=True),
                           self.labels.to(device, non_blocking=True), self.weights.to(device, non_blocking=True),
                           self.num_conversations)


def shifted_labels(tokens: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and their weights for one conversation (length preserved; last position predicts nothing)."""
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    w = np.zeros(len(tokens), dtype=np.float32)
    labels[:-1] = tokens[1:]
    w[:-1] = weights[1:]
    labels[w == 0] = IGNORE
    return labels, w


def pack(tokens: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> PackedBatch:
    """Concatenate conversations into one row of shape [1, sum(lengths)]."""
    ids, pos, labels, w = [], [], [], []
    for t, wt in zip(tokens, weights):
        t = np.asarray(t, dtype=np.int64)
        lab, lw = shifted_labels(t, np.asarray(wt, dtype=np.float32))
        ids.append(t)
        pos.append(np.arange(len(t), dtype=np.int64))
        labels.append(lab)
        w.append(lw)

    def row(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts))[None]

    return PackedBatch(row(ids), row(pos), row(labels), row(w), len(ids))


def dummy_batch() -> PackedBatch:
    """A one-token row with no loss, for a rank that has nothing to evaluate (sharded engines need
    every rank to run the same number of forwards)."""
    return pack([np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.float32)])

