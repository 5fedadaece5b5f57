"""C-RLFT loss: token cross-entropy weighted by per-token weights, normalised over the global batch.

    loss = sum_over_all_ranks_and_bins(w_t * CE_t) / sum_over_all_ranks_and_bins(w_t)

Class weights (e.g. GPT-4 answers 1.0, GPT-3.5 answers 0.1) therefore scale each token's gradient
as in the OpenChat paper; plain SFT is the case w in {0, 1} (mean CE over supervised tokens). The
denominator is all-reduced once per step, before the forward passes, so every rank and every
gradient-accumulation micro-batch divides by the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ochat.training.packing import IGNORE


def weighted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w_t * CE_t) over a packed row (at least fp32 math whatever the logits dtype)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * weights.flatten().to(ce.dtype)).sum()


def global_weight_sum(local: float, device: torch.device) -> torch.Tensor:
    """The step's total loss weight over all ranks (a float64 scalar, identical everywhere)."""
    total = torch.tensor(float(local), dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total
