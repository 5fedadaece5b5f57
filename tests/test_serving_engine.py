"""The continuous-batching engine and the incremental detokenizer, below the HTTP layer."""

from __future__ import annotations

import asyncio

import pytest

from ochat.serving.engine import QueueFullError, SamplingParams
from ochat.serving.engine.transformers_engine import TransformersEngine
from ochat.serving.generation import IncrementalDetokenizer


async def _generate(engine, prompt, request_id, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0.0)
    tokens, reason = [], None
    async for out in engine.generate(prompt, SamplingParams(**kw), request_id):
        tokens += out.token_ids
        reason = out.finish_reason
    return tokens, reason


@pytest.fixture(scope="module")
def engines(tiny_model):
    whole = TransformersEngine(str(tiny_model), max_num_seqs=8, stop_token_ids=[32000])
    chunked = TransformersEngine(str(tiny_model), max_num_seqs=8, prefill_chunk=16, prefill_budget=16,
                                 stop_token_ids=[32000])
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
