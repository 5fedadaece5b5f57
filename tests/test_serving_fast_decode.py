"""The Llama-family decode step with the in-place KV cache (ochat/serving/engine/fast_decode.py), checked
against transformers' own forward and against the engine's transformers path."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from ochat.serving.engine import SamplingParams
from ochat.serving.engine.fast_decode import RowKVCache, decode_hidden, supports_fast_decode
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


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.inference_mode()
def test_decode_steps_match_transformers_forward(arch):
    model = _model(arch)
    assert supports_fast_decode(model)
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 500) for _ in range(n)] for n in (5, 23, 11)]
    # prefill as the engine does: one left-padded batch through transformers
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    prefill = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   cache=prefill, use_cache=True).logits[:, -1]
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


def test_engine_fast_path_equals_transformers_path(tmp_path):
    """Requests joining and leaving (more requests than rows, different lengths, chunked prefill): the same
    greedy tokens as the engine's transformers path, which the other engine tests check against one at a time."""
    _model("llama").save_pretrained(tmp_path)     # no window: the transformers path fails past a sliding window
    rng = random.Random(1)
    requests = [([1] + [rng.randrange(2, 500) for _ in range(rng.randrange(2, 60))], rng.randrange(1, 24))
                for _ in range(10)]

    def run(fast: bool) -> dict[str, list[int]]:
        core = EngineCore(str(tmp_path), max_num_seqs=4, dtype="float32", prefill_chunk=24, prefill_budget=48)
        assert core._fast
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
