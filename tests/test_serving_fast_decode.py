"""The Llama-family decode step with the in-place KV cache (ochat/serving/engine/fast_decode.py), checked
against transformers' own forward and against the engine's transformers path."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from ochat.serving.engine import SamplingParams
from ochat.serving.engine.fast_decode import RowKVCache, decode_hidden, fuse_projections, supports_fast_decode
from ochat.serving.engine.packed_linear import pack_linears
from ochat.serving.engine.transformers_engine import EngineCore

SMALL = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    # a window shorter than the prompts: the cached K/V of a sliding layer are only its last tokens
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=16)).eval()


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, 500) for _ in range(n)] for n in (5, 23, 11)]


def _prefill(model, seqs: list[list[int]]) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill as the engine does: one left-padded batch through transformers; (cache, last logits)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    prefill = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   cache=prefill, use_cache=True).logits[:, -1]
    return prefill, logits


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.inference_mode()
def test_decode_steps_match_transformers_forward(arch):
    model = _model(arch)
    assert supports_fast_decode(model)
    seqs = _prompts()
    prefill, logits = _prefill(model, seqs)
    cache = RowKVCache(model, max_len=256)
    cache.add(prefill, [2, 0, 1], [len(seqs[i]) for i in (2, 0, 1)])     # in another order than the prefill
    seqs = [seqs[i] for i in (2, 0, 1)]
    nxt = logits[[2, 0, 1]].argmax(-1)
    for step in range(30):                 # crosses the 32-column block and the sliding window
        if step == 12:                     # the first row leaves; the last moves into its slot
            order = cache.keep([1, 2])
            assert order == [2, 1]
            seqs, nxt = [seqs[i] for i in order], nxt[order]
        seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
        positions = torch.tensor([len(s) - 1 for s in seqs])
        hidden = decode_hidden(model, cache, nxt, positions)
        fast = model.lm_head(hidden)
        for s, row in zip(seqs, fast):      # each sequence alone, no cache, no padding
            ref = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
        nxt = fast.argmax(-1)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("mistral", torch.bfloat16), ("qwen2", torch.float32)])
@torch.inference_mode()
def test_fused_projections_give_the_same_bits(arch, dtype):
    """q|k|v and gate|up fused into one linear each (prepacked too, in bf16): the decode step's hidden states are
    bit for bit those of the model's own projections (qwen2: with the q/k/v biases)."""
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(**SMALL)) if arch == "qwen2" else _model(arch)).to(dtype).eval()
    fused = fuse_projections(model)
    assert fused is not None and len(fused) == 2 and (fused[0].qkv.bias is not None) == (arch == "qwen2")
    if dtype == torch.bfloat16:
        assert pack_linears(fused) == 4 and pack_linears(model) > 0
    seqs = _prompts()
    prefill, logits = _prefill(model, seqs)
    caches = [RowKVCache(model, max_len=256) for _ in range(2)]
    for cache in caches:
        cache.add(prefill, [0, 1, 2], [len(s) for s in seqs])
    nxt = logits.argmax(-1)
    for step in range(20):
        positions = torch.tensor([len(s) + step for s in seqs])
        plain, with_fused = (decode_hidden(model, cache, nxt, positions, f) for cache, f in zip(caches, (None, fused)))
        assert torch.equal(plain, with_fused), step
        nxt = model.lm_head(plain).argmax(-1)


@torch.inference_mode()
def test_float32_kv_cache_of_a_bf16_model_matches_transformers_forward():
    """A bf16 model decoding over a float32 K/V cache (the engine's choice for small models on CPU): each step's
    logits are those of transformers' own bf16 forward over the whole sequence, within bf16's precision."""
    model = _model("llama").to(torch.bfloat16)
    seqs = _prompts()
    prefill, logits = _prefill(model, seqs)
    cache = RowKVCache(model, max_len=256, dtype=torch.float32)
    cache.add(prefill, [0, 1, 2], [len(s) for s in seqs])
    assert cache.keys[0].dtype == torch.float32
    nxt = logits.argmax(-1)
    for _ in range(12):
        seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
        hidden = decode_hidden(model, cache, nxt, torch.tensor([len(s) - 1 for s in seqs]))
        assert hidden.dtype == torch.bfloat16
        fast = model.lm_head(hidden).float()
        for s, row in zip(seqs, fast):
            ref = model(input_ids=torch.tensor([s])).logits[0, -1].float()
            torch.testing.assert_close(row, ref, rtol=0, atol=1e-2)        # logits here are within +-0.7
        nxt = fast.argmax(-1)


def test_engine_fast_path_equals_transformers_path(tmp_path):
    """Requests joining and leaving (more requests than rows, different lengths, chunked prefill): the same
    greedy tokens as the engine's transformers path, which the other engine tests check against one at a time."""
    _model("llama").save_pretrained(tmp_path)     # no window: the transformers path fails past a sliding window
    rng = random.Random(1)
    requests = [([1] + [rng.randrange(2, 500) for _ in range(rng.randrange(2, 60))], rng.randrange(1, 24))
                for _ in range(10)]

    def run(fast: bool) -> dict[str, list[int]]:
        core = EngineCore(str(tmp_path), max_num_seqs=4, dtype="float32", prefill_chunk=24, prefill_budget=48)
        assert core._fast and core._fused is not None and core._kv_dtype == torch.float32     # a small model
        core._fast = fast
        for i, (prompt, n) in enumerate(requests):
            core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while core.has_unfinished_requests():
            for rid, o in core.step():
                out.setdefault(rid, []).extend(o.token_ids)
        return out

    fast, hf = run(True), run(False)
    assert fast == hf
    assert [len(fast[f"r{i}"]) for i in range(10)] == [n for _, n in requests]


@torch.inference_mode()
def test_prepacked_linear_layers_give_transformers_logits():
    """bf16 on CPU: every linear layer is prepacked for oneDNN, the logits stay those of the unpacked model,
    and a head tied to the embeddings keeps the embeddings' weight."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 200, 33, 7]])
    before = model(input_ids=ids).logits
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_linears(model) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"     # released
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_engine_past_the_sliding_window_equals_full_forward(tmp_path):
    """Mistral with a window shorter than the prompts (whole and chunked prefill): each request's greedy tokens
    are those of transformers' forward over the whole sequence, step by step (the transformers path of the
    engine fails there: its left-padded mask does not fit a sliding cache)."""
    model = _model("mistral")
    model.save_pretrained(tmp_path)
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(2, 500) for _ in range(n)] for n in (10, 32, 58, 34)]
    expected = []
    with torch.inference_mode():
        for p in prompts:
            seq = list(p)
            for _ in range(8):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            expected.append(seq[len(p):])
    for chunk in (24, 512):
        core = EngineCore(str(tmp_path), max_num_seqs=3, dtype="float32", prefill_chunk=chunk,
                          prefill_budget=max(48, chunk))
        assert core._fast
        for i, p in enumerate(prompts):
            core.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        out: dict[str, list[int]] = {}
        while core.has_unfinished_requests():
            for rid, o in core.step():
                out.setdefault(rid, []).extend(o.token_ids)
        assert [out[f"r{i}"] for i in range(len(prompts))] == expected, chunk
