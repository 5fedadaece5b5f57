"""Variable-length attention without FlashAttention: what `flash_attn_varlen_func` does, with sdpa.

A packed row holds several conversations; sdpa with transformers' block-diagonal mask computes the
whole row's L x L scores and masks most of them. Here each conversation (found from the position
ids restarting at 0) gets its own causal sdpa call, so attention costs sum(L_i^2) instead of L^2 and
no mask is built. Registered with transformers as the attention implementation "ochat_varlen_sdpa";
it falls back to plain sdpa for anything but a single packed row (generation, padded batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ochat_varlen_sdpa"

# Architectures whose attention layers receive the position ids. Others (e.g. gpt_bigcode in transformers
# 5.23, whose attention never sees them) train with plain sdpa and transformers' block-diagonal mask.
ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"}


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    length = query.shape[2]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = list(zip(starts, starts[1:] + [length]))
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                                    dropout_p=dropout, scale=scaling) for s, e in bounds], dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make "ochat_varlen_sdpa" a valid `attn_implementation`; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    return NAME


TORCH_VARLEN = "ochat_torch_varlen"


def torch_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """The same per-conversation causal attention with torch's own varlen kernel (CUDA; torch >= 2.10):
    one call for the whole packed row, sequence boundaries from the position ids."""
    from torch.nn.attention.varlen import varlen_attn

    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return varlen_sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    length = query.shape[2]
    starts = (position_ids[0] == 0).nonzero().flatten()
    if len(starts) == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_full((1,), length)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, heads, head_dim]
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),
                      enable_gqa=k.shape[1] != q.shape[1])
    return out[None], None  # [1, L, heads, head_dim], as transformers' attention functions return


def register_torch_varlen() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
    return TORCH_VARLEN
