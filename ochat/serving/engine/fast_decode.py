"""The decode step of the running batch for the Llama family (llama, mistral, qwen2), with a KV cache that is
written in place.

Why (profiled on the 2-core CPU, bf16, 32 rows): through transformers' forward with a left-padded
`DynamicCache`, a decode step of the 243M model spent a third of its time in `torch.cat` (the cache grows by
a copy of itself every step, for every layer) and a fifth in SDPA (`repeat_kv` copies K and V for GQA when a
mask is passed, and the CPU flash kernel is slow for one query: 9 ms per layer against 0.5 ms for two
matmuls); on the tiny model the SDPA calls and the per-call work of the HF forward (mask building, output
wrappers) were most of a step.

Here each row of the batch owns a slot (row) of a preallocated buffer per layer, [rows, kv heads, columns,
head dim], its token at position p in column p (no left padding); a step writes the new K/V in place and
attends over the whole buffer with a per-row mask, so every matmul operand is contiguous. The columns grow in
blocks (an amortised copy every `BLOCK` steps), the rows geometrically. The step reuses the model's own
modules (embeddings, norms, projections, rotary embedding, MLP): only the loop over the layers and the
attention are written here. Prefill still runs through transformers (a `DynamicCache`), whose K/V are then
copied into the rows. Other architectures use the engine's transformers path.

For small models the step is per-call overhead (the tiny model at 8 rows: ~560 aten operator calls a step,
profiled), so `fuse_projections` gives the step q|k|v and gate|up as one linear layer each (three calls fewer
per layer; each output is the same dot product, so the same bits, checked in tests). The fused copies cost
memory, which is why the engine fuses only small models. Their K/V are kept in float32 too (`RowKVCache(...,
dtype=)`, twice bf16's memory): a batched bf16 matmul has a floor of ~15 us a call here, against ~5 for a float32
one (one row, 256 columns; the gap closes by 32 rows), and scores and probabilities are then not rounded to bf16
before the softmax and the second matmul.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import DynamicCache

FAST_DECODE_TYPES = ("llama", "mistral", "qwen2")
BLOCK = 32                      # columns are added this many at a time


def supports_fast_decode(model) -> bool:
    """The model is a plain decoder of the Llama family whose layers this module knows how to run."""
    config = model.config
    if config.model_type not in FAST_DECODE_TYPES:
        return False
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return False                        # qwen2 windows some layers only (layer_types)
    base = model.base_model
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(base, name) for name in needed) or model.get_output_embeddings() is None:
        return False
    attn = base.layers[0].self_attn
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


class FusedLayer(nn.Module):
    """One layer's q, k and v projections as one linear layer, and its MLP's gate and up projections as another."""

    def __init__(self, qkv: nn.Linear, qkv_sizes: list[int], gate_up: nn.Linear, gate_size: int):
        super().__init__()
        self.qkv, self.gate_up = qkv, gate_up
        self.qkv_sizes, self.gate_size = qkv_sizes, gate_size


def _concat(linears: list[nn.Module]) -> nn.Linear | None:
    """Plain linear layers stacked on their outputs (their weights and biases concatenated), or None."""
    if not all(type(m) is nn.Linear for m in linears) or len({m.bias is None for m in linears}) != 1:
        return None                            # e.g. LoRA-wrapped layers, or biases on some only
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


def fuse_projections(model) -> nn.ModuleList | None:
    """A `FusedLayer` per decoder layer for `decode_hidden` (copies of the weights: the model is unchanged),
    or None where some layer's projections are not plain linear layers."""
    fused = nn.ModuleList()
    for layer in model.base_model.layers[: model.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = _concat([mlp.gate_proj, mlp.up_proj]) if hasattr(mlp, "gate_proj") else None
        if qkv is None or gate_up is None:
            return None
        sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        fused.append(FusedLayer(qkv, sizes, gate_up, mlp.gate_proj.out_features))
    return fused


class RowKVCache:
    """K and V of the running batch: row r holds its sequence's tokens in columns 0 .. length - 1."""

    def __init__(self, model, max_len: int, dtype: torch.dtype | None = None):
        config, attn = model.config, model.base_model.layers[0].self_attn
        self.n_layers = config.num_hidden_layers
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.head_dim = attn.head_dim
        embeddings = model.get_input_embeddings().weight     # (the linear layers' weights may be packed)
        self.dtype, self.device = dtype or embeddings.dtype, embeddings.device      # K/V in the model's dtype, or this
        self.max_len = max_len
        self.rows = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(0, 0)

    @property
    def columns(self) -> int:
        return self.keys[0].shape[2]

    def _alloc(self, rows: int, columns: int) -> None:
        """New zeroed buffers (zeros: a masked column must not hold NaN, 0 x NaN is NaN), the old rows copied."""
        keep_rows, keep_cols = min(self.rows, rows), min(self.columns if self.keys else 0, columns)
        shape = (rows, self.kv_heads, columns, self.head_dim)
        for buffers in (self.keys, self.values):
            for i in range(self.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if buffers and keep_rows and keep_cols:
                    new[:keep_rows, :, :keep_cols] = buffers[i][:keep_rows, :, :keep_cols]
                if len(buffers) > i:
                    buffers[i] = new
                else:
                    buffers.append(new)

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows of `columns` tokens (grown, never shrunk here)."""
        have_rows = self.keys[0].shape[0]
        if rows <= have_rows and columns <= self.columns:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_cols = self.columns if columns <= self.columns else min(self.max_len, -(-columns // BLOCK) * BLOCK)
        self._alloc(new_rows, max(new_cols, columns))

    def add(self, prefill: DynamicCache, rows: list[int], lengths: list[int]) -> None:
        """Append rows `rows` of a left-padded prefill cache, whose sequences have `lengths` tokens each."""
        self.reserve(self.rows + len(rows), max(lengths) + 1)
        new = slice(self.rows, self.rows + len(rows))
        for layer, (k_buf, v_buf) in enumerate(zip(self.keys, self.values)):
            keys, values = prefill.layers[layer].keys, prefill.layers[layer].values
            k_buf[new], v_buf[new] = 0, 0           # slots freed by departed rows hold their old K/V
            for slot, (row, n) in enumerate(zip(rows, lengths), start=self.rows):
                # A sliding-window layer kept only the last tokens; older ones are outside every later window.
                m = min(n, keys.shape[2])
                k_buf[slot, :, n - m:n] = keys[row, :, keys.shape[2] - m:]
                v_buf[slot, :, n - m:n] = values[row, :, values.shape[2] - m:]
        self.rows += len(rows)

    def keep(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (ascending): the last rows move into the holes. Returns the old index of each new row."""
        order = list(range(self.rows))
        kept = set(keep)
        holes = [i for i in range(len(keep)) if i not in kept]
        movers = [i for i in keep if i >= len(keep)]
        if holes:
            dst, src = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            for buf in self.keys + self.values:
                buf[dst] = buf[src]
            for h, m in zip(holes, movers):
                order[h] = m
        self.rows = len(keep)
        return order[: self.rows]


def decode_hidden(model, cache: RowKVCache, token_ids: torch.Tensor, positions: torch.Tensor,
                  fused: nn.ModuleList | None = None) -> torch.Tensor:
    """One decode step of every row: feeds token_ids[r] at position positions[r] (= the row's cached length),
    writes its K/V into the cache and returns the final hidden states [rows, hidden]. `fused`: the layers'
    projections from `fuse_projections`, used instead of the model's own."""
    base = model.base_model
    rows = cache.rows
    cache.reserve(rows, int(positions.max()) + 1)
    x = base.embed_tokens(token_ids[:, None])                       # [rows, 1, hidden]
    cos, sin = base.rotary_emb(x, positions[:, None])
    mask = _row_mask(positions, cache.columns, getattr(model.config, "sliding_window", None))
    rotate = sys.modules[type(base.layers[0].self_attn).__module__].apply_rotary_pos_emb
    slot = torch.arange(rows, device=positions.device)
    for i, layer in enumerate(base.layers[: model.config.num_hidden_layers]):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if fused is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = fused[i].qkv(h).split(fused[i].qkv_sizes, dim=-1)
        q, k, v = (t.view(rows, 1, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # [rows, heads, 1, dim]
        q, k = rotate(q, k, cos, sin)
        keys, values = cache.keys[i][:rows], cache.values[i][:rows]
        keys[slot, :, positions] = k[:, :, 0].to(keys.dtype)
        values[slot, :, positions] = v[:, :, 0].to(values.dtype)
        out = _attend(q.to(keys.dtype), keys, values, mask, attn.scaling).to(x.dtype)
        x = x + attn.o_proj(out.reshape(rows, 1, -1))
        h = layer.post_attention_layernorm(x)
        if fused is None:
            x = x + layer.mlp(h)
        else:                                   # the Llama family's MLP: down(act(gate(h)) * up(h))
            gate, up = fused[i].gate_up(h).split(fused[i].gate_size, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
    return base.norm(x)[:, 0]


def _row_mask(positions: torch.Tensor, columns: int, window: int | None) -> torch.Tensor:
    """Additive float32 mask [rows, 1, 1, columns]: 0 where a row's query at `positions` may look, -inf elsewhere."""
    col = torch.arange(columns, device=positions.device)[None, :]
    pos = positions[:, None]
    visible = col <= pos
    if window is not None:
        visible &= col > pos - window                 # transformers' sliding_window_overlay
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=positions.device)
    return mask.masked_fill_(~visible, float("-inf"))[:, None, None, :]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one query per row, the query heads grouped over their KV head (GQA without copying K/V);
    softmax in float32 as transformers' eager attention. q [rows, heads, 1, dim] -> [rows, heads, dim]."""
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling + mask
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(rows, heads, dim)
