"""C-RLFT loss: token cross-entropy weighted by per-token weights, normalised over the global batch.

    loss = sum_over_all_ranks_and_bins(w_t * CE_t) / sum_over_all_ranks_and_bins(w_t)

Class weights (e.g. GPT-4 answers 1.0, GPT-3.5 answers 0.1) therefore scale each token's gradient
as in the OpenChat paper; plain SFT is the case w in {0, 1} (mean CE over supervised tokens). The
denominator is all-reduced once per step, before the forward passes, so every rank and every
gradient-accumulation micro-batch divides by the same number.

The lm head and the cross-entropy run together, `chunk` positions at a time (`linear_cross_entropy`):
a [positions, vocab] fp32 logits block is never materialised, only [chunk, vocab]. The gradients of
each chunk are computed in the forward pass, while its logits exist (as Liger's fused linear
cross-entropy does), so nothing is recomputed and the backward pass only scales them.
`chunked_lm_head(model)` makes a Hugging Face causal LM's head do this while a target is set, inside
the model's own forward (where DDP / FSDP / ZeRO-3 expect the head's weight to be used).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ochat.training.packing import IGNORE


def weighted_ce_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w_t * CE_t) over a packed row (at least fp32 math whatever the logits dtype)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * weights.flatten().to(ce.dtype)).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum(w * CE(hidden @ weight.T, labels)), chunk by chunk; gradients made in the forward pass."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, lab, w = hidden[s:s + chunk], labels[s:s + chunk], weights[s:s + chunk]
            logits = h @ weight.T
            logits = logits if logits.dtype == torch.float64 else logits.float()
            w = torch.where(lab == IGNORE, 0.0, w.to(logits.dtype))
            target = lab.clamp(min=0)
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * w).sum()
            if need_h or need_w:
                # d(w * CE)/d(logits) = w * (softmax - onehot), in place over the logits block
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(target), device=g.device), target] -= 1
                g.mul_(w[:, None])
                if need_h:
                    grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (g.T.to(h.dtype) @ h).to(grad_w.dtype)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total.to(torch.promote_types(hidden.dtype, torch.float32))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """sum(w_t * CE_t) of the logits `hidden @ weight.T` ([n, H] x [V, H]), at most `chunk` rows at a time."""
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     weights.reshape(-1), chunk)


class ChunkedHead:
    """A causal LM's output layer that returns sum(w * CE) instead of logits while `target` is set."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self.target: tuple[torch.Tensor, torch.Tensor, int] | None = None
        head.forward = self.forward  # the module (and its weight's name in the state dict) stays as it is

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            return F.linear(hidden, self.head.weight)
        labels, weights, chunk = self.target
        return linear_cross_entropy(hidden, self.head.weight, labels, weights, chunk)

    @contextlib.contextmanager
    def computing_loss(self, labels: torch.Tensor, weights: torch.Tensor, chunk: int) -> Iterator[None]:
        self.target = (labels, weights, chunk)
        try:
            yield
        finally:
            self.target = None


def chunked_lm_head(model: Any) -> ChunkedHead | None:
    """Install a ChunkedHead on a HF causal LM (under DDP / PEFT wrappers); None where the logits are
    post-processed after the head (final-logit soft-capping) or the head is not a bias-free Linear."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if getattr(inner.config, "final_logit_softcapping", None) or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return ChunkedHead(head)


def global_weight_sum(local: float, device: torch.device) -> torch.Tensor:
    """The step's total loss weight over all ranks (a float64 scalar, identical everywhere)."""
    total = torch.tensor(float(local), dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total
