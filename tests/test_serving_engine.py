"""The continuous-batching engine and the incremental detokenizer, below the HTTP layer."""

from __future__ import annotations

import asyncio

import pytest

from ochat.serving.engine import QueueFullError, SamplingParams
from ochat.serving.engine.transformers_engine import TransformersEngine
from ochat.serving.generation import IncrementalDetokenizer


async def _generate(engine, prompt, request_id, **kw):
    tokens, reason, _ = await _generate_full(engine, prompt, request_id, **kw)
    return tokens, reason


async def _generate_full(engine, prompt, request_id, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0.0)
    tokens, outs = [], []
    async for out in engine.generate(prompt, SamplingParams(**kw), request_id):
        tokens += out.token_ids
        outs.append(out)
    return tokens, outs[-1].finish_reason, outs


@pytest.fixture(scope="module")
def engines(tiny_model):
    # fp32: these tests compare exact outputs (bf16 results depend on the batch shape)
    whole = TransformersEngine(str(tiny_model), max_num_seqs=8, stop_token_ids=[32000], dtype="float32")
    chunked = TransformersEngine(str(tiny_model), max_num_seqs=8, prefill_chunk=16, prefill_budget=16,
                                 stop_token_ids=[32000], dtype="float32")
    yield whole, chunked
    whole.shutdown()
    chunked.shutdown()


def test_chunked_prefill_and_mixed_batch_equal_one_at_a_time(engines):
    whole, chunked = engines
    prompts = [[1] + list(range(100, 100 + n)) for n in (5, 70, 12, 40, 3)]     # 70 and 40: several chunks

    async def run():
        alone = [await _generate(whole, p, f"a{i}") for i, p in enumerate(prompts)]
        together = await asyncio.gather(*(_generate(chunked, p, f"b{i}") for i, p in enumerate(prompts)))
        return alone, together

    alone, together = asyncio.run(run())
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(r == "length" and len(t) == 12 for t, r in alone)


def test_per_request_sampling_in_one_batch(engines):
    whole, _ = engines

    async def run():
        return await asyncio.gather(
            _generate(whole, [1, 500, 600], "g", max_tokens=8),
            _generate(whole, [1, 500, 600], "s1", max_tokens=8, temperature=1.0, seed=5, top_k=50, top_p=0.9),
            _generate(whole, [1, 500, 600], "s2", max_tokens=8, temperature=1.0, seed=5, top_k=50, top_p=0.9),
            _generate(whole, [1, 500, 600], "p", max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0),
            _generate(whole, [1, 500, 600], "g2", max_tokens=3),
        )

    greedy, s1, s2, penalised, short = asyncio.run(run())
    assert s1 == s2                              # the same seed, the same tokens
    assert short[0] == greedy[0][:3] and short[1] == "length"
    assert len(set(penalised[0])) == len(penalised[0])     # strong penalties: no token repeats


def test_abort_frees_the_slot_and_queue_bound(tiny_model):
    engine = TransformersEngine(str(tiny_model), max_num_seqs=1, max_queue=1, stop_token_ids=[32000])

    async def run():
        long = engine.generate([1, 2, 3], SamplingParams(max_tokens=5000, ignore_eos=True), "long")
        await long.__anext__()
        assert engine.stats() == {"running": 1, "waiting": 0}
        waiting = engine.generate([1, 2, 3], SamplingParams(max_tokens=2), "w")
        first = asyncio.ensure_future(waiting.__anext__())
        await asyncio.sleep(0.2)
        assert engine.stats()["waiting"] == 1
        with pytest.raises(QueueFullError):
            await engine.generate([1], SamplingParams(max_tokens=1), "x").__anext__()
        await long.aclose()                     # the client went away: abort, the waiting one runs
        await first
        async for _ in waiting:
            pass
        for _ in range(100):
            if engine.stats() == {"running": 0, "waiting": 0}:
                break
            await asyncio.sleep(0.02)
        assert engine.stats() == {"running": 0, "waiting": 0}

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_detokenizer_never_splits_a_character(mistral_tokenizer):
    text = "héllo wörld 🦩🪿 𝔘𝔫𝔦 日本語のテキスト — ünïcödé ✓ done"
    ids = mistral_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(mistral_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)   # byte-fallback pieces
    detok = IncrementalDetokenizer(mistral_tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == mistral_tokenizer.decode(ids, skip_special_tokens=True)


# Requests that once broke the engine (issue 13): each must end alone (greedy, clipped, or its own error).
BAD_REQUESTS = {
    "tiny temperature": dict(temperature=1e-300, logprobs=3),
    "huge top_k, huge seed": dict(temperature=1.0, top_k=10**9, seed=2**64 + 5),
    "negative seed": dict(temperature=1.0, seed=-(2**70)),
    "token id outside the vocabulary": dict(prompt=[1, 10**9]),
    "nan penalty": dict(frequency_penalty=float("nan")),
    "penalty overflowing the logits": dict(temperature=1.0, frequency_penalty=-1e38, max_tokens=40, ignore_eos=True),
    "empty prompt": dict(prompt=[]),
    "negative max_tokens": dict(max_tokens=-1),
}


def test_bad_requests_next_to_good_ones_leave_them_unchanged(engines):
    whole, chunked = engines
    good = [[1] + list(range(200, 200 + n)) for n in (4, 9, 30)]       # 30: chunked in the chunked engine

    async def run(engine):
        alone = [await _generate(engine, p, f"alone{i}", max_tokens=10) for i, p in enumerate(good)]
        tasks = []
        for name, kw in BAD_REQUESTS.items():         # interleaved, so they share prefill groups and decode steps
            kw = dict(kw)
            tasks.append(_generate_full(engine, kw.pop("prompt", [1, 200, 201, 202]), name, **kw))
            tasks.append(_generate(engine, good[len(tasks) // 2 % 3], f"good{len(tasks)}", max_tokens=10))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return alone, results

    for engine in (whole, chunked):
        alone, results = asyncio.run(run(engine))
        for j, res in enumerate(results[1::2]):
            assert res == alone[j % 3], f"good request {j} changed next to a bad one"
        outcomes = dict(zip(BAD_REQUESTS, results[0::2]))
        for name in ("token id outside the vocabulary", "nan penalty", "penalty overflowing the logits",
                     "empty prompt", "negative max_tokens"):
            tokens, reason, outs = outcomes[name]
            assert reason == "error" and outs[-1].error, name
        assert "vocabulary" in outcomes["token id outside the vocabulary"][2][-1].error
        tokens, reason, outs = outcomes["tiny temperature"]        # greedy: the same tokens as temperature 0
        assert reason == "length" and tokens == asyncio.run(_generate(engine, [1, 200, 201, 202], "g"))[0]
        assert all(lp.logprob <= 0 for o in outs for lp in o.logprobs)
        for name in ("huge top_k, huge seed", "negative seed"):
            assert outcomes[name][1] == "length" and len(outcomes[name][0]) == 12, name
        assert engine.stats() == {"running": 0, "waiting": 0}


def test_prompt_logprobs_equal_transformers_and_max_tokens_zero(tiny_model, engines):
    import torch
    from transformers import AutoModelForCausalLM

    whole, chunked = engines
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    prompts = [[1] + [(37 * i * i + 11 * i) % 32000 for i in range(n)] for n in (0, 3, 16, 21, 50)]   # 17: a 1-token chunk
    with torch.no_grad():
        expected = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1) for p in prompts]

    async def run(engine):
        scored = await asyncio.gather(*(_generate_full(engine, p, f"score{i}", max_tokens=0, prompt_logprobs=2)
                                        for i, p in enumerate(prompts)))
        generated = await _generate_full(engine, prompts[3], "gen", max_tokens=3, prompt_logprobs=0)
        return scored, generated

    for engine in (whole, chunked):             # chunked: 21 and 50 tokens are prefilled 16 at a time
        scored, (gen_tokens, gen_reason, gen_outs) = asyncio.run(run(engine))
        for p, logp, (tokens, reason, outs) in zip(prompts, expected, scored):
            assert tokens == [] and reason == "length" and len(outs) == 1
            plp = outs[0].prompt_logprobs
            assert len(plp) == len(p) and plp[0] is None
            for pos, entry in enumerate(plp[1:], start=1):
                assert abs(entry.logprob - float(logp[pos - 1, p[pos]])) < 1e-4
                assert [t for t, _ in entry.top] == logp[pos - 1].topk(2).indices.tolist()
        assert gen_reason == "length" and len(gen_tokens) == 3
        assert len(gen_outs[0].prompt_logprobs) == len(prompts[3]) and gen_outs[0].token_ids
        assert all(o.prompt_logprobs is None for o in gen_outs[1:])


def test_auto_dtype_is_bf16_where_the_cpu_has_bf16_units():
    import torch

    from ochat.serving.engine.transformers_engine import cpu_has_bf16_units, resolve_dtype

    flags = open("/proc/cpuinfo").read().split()
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_bf16_units() == has
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if has else torch.float32)
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
