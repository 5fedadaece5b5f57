"""The OpenAI-compatible server with the real `openai` client against the tiny model (in-process uvicorn)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import openai
import pytest

from ochat.serving.inprocess import start_server
from ochat.templates import ConversationEncoder, conversation_from_openai

KEY = "sk-test-123"
MAX_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_model):
    with start_server(str(tiny_model), max_model_len=MAX_LEN, max_num_seqs=64) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def encoder(server) -> ConversationEncoder:
    return server.app.state.served.encoder


def chat(client, server, content="Hello, who are you?", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": content}], **kw)


def metric(server, name: str) -> float:
    text = httpx.get(server.root_url + "/metrics").text
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_non_stream_and_usage(client, server, encoder):
    r = chat(client, server, max_tokens=8)
    assert r.object == "chat.completion" and r.model == server.model_name
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    prompt = encoder.encode_one(conversation_from_openai([{"role": "user", "content": "Hello, who are you?"}]),
                                inference=True)[0]
    assert r.usage.prompt_tokens == len(prompt)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_non_stream(client, server):
    full = chat(client, server, max_tokens=20)
    chunks = list(chat(client, server, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


TRICKY_TEXTS = ["", " hello", 'quote " backslash \\ slash /', "\n\r\t\b\f\x00\x01\x1f\x7f", "caf\u00e9 \u4e2d\u6587 \U0001f600",
                "\u2028\u2029\x85 line breaks", "\ufffd", "</script>", "\x00ochat-text-slot\x00"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_pre_serialised_text_events_equal_the_pydantic_models(include_usage):
    """The streamed text delta, filled into its event serialised once, has the very bytes of its pydantic chunk
    (chat and completions, every character up to U+3000 and tricky ones), and a model name holding the slot
    falls back to pydantic."""
    from ochat.serving import protocol as P
    from ochat.serving.serving_engine import TextEventTemplate, sse

    texts = TRICKY_TEXTS + ["".join(map(chr, range(i, i + 64))) for i in range(0, 0x3000, 64)]
    for model in ("openchat_3.5", 'we"ird\u2028 m\u00f6del \x00ochat-text-slot\x00', "\x00ochat-text-slot\x00"):
        usage = {"usage": None} if include_usage else {}
        chat = lambda t: P.ChatCompletionChunk(id="chatcmpl-1", created=5, model=model, **usage, choices=[  # noqa: E731
            P.ChatChunkChoice(index=3, delta=P.DeltaMessage(content=t), logprobs=None, finish_reason=None)])
        completion = lambda t: P.CompletionChunk(id="cmpl-1", created=5, model=model, **usage, choices=[  # noqa: E731
            P.CompletionChoice(index=0, text=t, logprobs=None, finish_reason=None)])
        for build in (chat, completion):
            template = TextEventTemplate(build)
            assert (template.head is None) == (model == "\x00ochat-text-slot\x00")
            for text in texts:
                assert template.event(text) == sse(build(text)), (model, text)


def test_n_choices_and_seed(client, server):
    r = chat(client, server, n=3, temperature=1.0, seed=7, max_tokens=10, logprobs=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = chat(client, server, n=3, temperature=1.0, seed=7, max_tokens=10)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in r.choices}) > 1          # seed + index: choices differ
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    stream = list(chat(client, server, n=2, temperature=1.0, seed=1, max_tokens=6, stream=True))
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_strings(client, server):
    text = chat(client, server, max_tokens=30).choices[0].message.content
    assert len(text) > 10
    stop = text[5:9]
    cut = text.index(stop)
    r = chat(client, server, max_tokens=30, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, server, max_tokens=30, stop=stop, stream=True)
                       if c.choices)
    assert streamed == text[:cut]


def test_condition_changes_prompt(client, server, encoder):
    messages = [{"role": "user", "content": "Write a function"}]
    for condition in ("Code", "Math Correct"):
        r = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=10,
                                           extra_body={"condition": condition})
        ids = encoder.encode_one(conversation_from_openai(messages), inference=True, condition=condition)[0]
        assert r.usage.prompt_tokens == len(ids)
        # The same prompt sent as raw text gives the same greedy answer: the condition went into the prompt.
        raw = encoder.tokenizer.decode(ids)
        assert f"{condition} Assistant:" in raw
        c = client.completions.create(model=server.model_name, prompt=raw, temperature=0, max_tokens=10)
        assert c.choices[0].text == r.choices[0].message.content
    default = chat(client, server, content="Write a function", max_tokens=10)
    code = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=10,
                                          extra_body={"condition": "Code"})
    assert default.usage.prompt_tokens != code.usage.prompt_tokens


def test_system_prompt_in_the_released_layout(client, server):
    """openchat_3.5's released chat_template: the system prompt is bare text + <|end_of_turn|>."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=10)
    released = "<s>You are a helpful assistant.<|end_of_turn|>GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant:"
    c = client.completions.create(model=server.model_name, prompt=released, temperature=0, max_tokens=10)
    assert r.usage.prompt_tokens == c.usage.prompt_tokens == 24     # upstream's ids for this prompt
    assert c.choices[0].text == r.choices[0].message.content


def test_logprobs_and_penalties(client, server):
    r = chat(client, server, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)       # greedy picks the best
    r = chat(client, server, max_tokens=8, temperature=0.8, top_p=0.9, presence_penalty=1.5, frequency_penalty=1.0,
             extra_body={"top_k": 20}, seed=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_max_token_aliases(client, server):
    for field in ("max_tokens", "max_completion_tokens", "max_generated_tokens"):
        r = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}],
                                           temperature=0, extra_body={field: 3})
        assert r.usage.completion_tokens <= 3


def test_model_aliases_and_models_list(client, server, tiny_model):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]
    info = models[0].model_extra["ochat"]
    assert info["model_type"] == "openchat_3.5" and "Code" in info["conditions"]
    assert info["default_condition"] == "GPT4 Correct" and info["max_context"] == MAX_LEN
    for name in ("openchat_3.5", "openchat_v3.2_mistral", tiny_model.name):
        assert client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=1).choices


def test_completions_raw_prompt(client, server):
    r = client.completions.create(model=server.model_name, prompt=["Once upon a time", "The sky is"], max_tokens=5,
                                  temperature=0, logprobs=2, echo=False)
    assert r.object == "text_completion" and sorted(c.index for c in r.choices) == [0, 1]
    assert len(r.choices[0].logprobs.tokens) == r.choices[0].logprobs.text_offset.__len__() >= 1
    stream = list(client.completions.create(model=server.model_name, prompt="Once upon a time", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == \
        client.completions.create(model=server.model_name, prompt="Once upon a time", max_tokens=5,
                                  temperature=0).choices[0].text


def _error(server, body, path="/chat/completions", headers=None, content=None):
    if content is not None:
        headers = {"content-type": "application/json", **(headers or {})}
    r = httpx.post(server.base_url + path, json=None if content is not None else body, content=content,
                   headers=headers, timeout=60)
    data = r.json()
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    return r.status_code, data["error"]


def test_errors(server):
    msg = [{"role": "user", "content": "hi"}]
    status, err = _error(server, None, content=b'{"model": "x", "messages": [')
    assert status == 400 and "JSON" in err["message"]
    status, err = _error(server, {"model": server.model_name})
    assert status == 400 and err["param"] == "messages"
    status, err = _error(server, {"model": server.model_name, "messages": msg, "temperature": 9})
    assert status == 400 and err["param"] == "temperature"
    status, err = _error(server, {"model": server.model_name, "messages": [{"role": "robot", "content": "x"}]})
    assert status == 400
    status, err = _error(server, {"model": "gpt-4", "messages": msg})
    assert status == 404 and err["code"] == "model_not_found"
    status, err = _error(server, {"model": server.model_name, "messages": msg, "n": 1000})
    assert status == 400 and err["param"] == "n"
    status, err = _error(server, {"model": server.model_name, "messages": msg, "max_tokens": 100000})
    assert status == 400 and err["param"] == "max_tokens"
    long = [{"role": "user", "content": "hello " * 600}]
    status, err = _error(server, {"model": server.model_name, "messages": long})
    numbers = [int(x) for x in re.findall(r"\d+", err["message"])]
    assert status == 400 and MAX_LEN in numbers and any(n > MAX_LEN for n in numbers), err
    status, err = _error(server, {"model": server.model_name, "messages": msg, "max_tokens": MAX_LEN - 5})
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = _error(server, None, content=b"x" * (5 * 1024 * 1024))
    assert status == 413
    status, err = _error(server, {"model": server.model_name, "prompt": []}, path="/completions")
    assert status == 400
    r = httpx.get(server.base_url + "/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_typed_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}], top_p=5)


def test_parallel_requests_equal_sequential(tiny_model):
    """Greedy answers do not depend on which requests share a batch, in float32. (In bfloat16, the default on
    CPUs with bf16 units, they may: the matmul kernels round differently per batch shape, as vLLM's do; about
    one greedy answer in seven of this random model differed between batched and one-at-a-time.)"""
    prompts = [f"Request number {i}: tell me about " + "topic " * (i % 7) for i in range(32)]
    with start_server(str(tiny_model), max_model_len=MAX_LEN, max_num_seqs=64, dtype="float32") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)

        def ask(p: str) -> str:
            return chat(client, server, content=p, max_tokens=16).choices[0].message.content

        sequential = [ask(p) for p in prompts[:8]]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            parallel = list(pool.map(ask, prompts))
    assert all(isinstance(t, str) for t in parallel) and len(parallel) == 32
    assert parallel[:8] == sequential
    assert len(set(parallel)) > 1


def test_disconnect_mid_stream_frees_slot(server):
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400,
            "temperature": 0.7, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any('"content"' in line for line in got)
            assert metric(server, "ochat_num_requests_running") >= 1
    deadline = time.monotonic() + 10
    while metric(server, "ochat_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "ochat_num_requests_running") == 0
    assert metric(server, "ochat_num_requests_waiting") == 0


def test_metrics(server):
    text = httpx.get(server.root_url + "/metrics").text
    for name in ("ochat_prompt_tokens_total", "ochat_generation_tokens_total", "ochat_time_to_first_token_seconds_bucket",
                 "ochat_e2e_request_latency_seconds_bucket", "ochat_request_success_total"):
        assert name in text
    assert metric(server, "ochat_generation_tokens_total") > 0
    assert httpx.get(server.root_url + "/health").json() == {"status": "ok"}


def test_api_keys_and_cors(tiny_model):
    with start_server(str(tiny_model), api_keys=[KEY, "other"], cors_origins=["http://example.com"]) as s:
        good = openai.OpenAI(base_url=s.base_url, api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model=s.model_name, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        r = httpx.get(s.base_url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.root_url + "/metrics").status_code == 401
        assert httpx.get(s.root_url + "/health").status_code == 200
        pre = httpx.options(s.base_url + "/chat/completions", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"


def test_queue_full_429_then_503_after_shutdown(tiny_model):
    with start_server(str(tiny_model), max_num_seqs=1, max_queue=1) as s:
        body = {"model": s.model_name, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", s.base_url + "/chat/completions", json=body) as running:
                running_lines = running.iter_lines()       # keep it: a dropped iterator closes the response
                for line in running_lines:                  # a first token: it runs (no longer waits)
                    if '"content"' in line and '"role"' not in line:
                        break
                with http.stream("POST", s.base_url + "/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200
                    deadline = time.monotonic() + 10
                    while metric(s, "ochat_num_requests_waiting") < 1 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    status, err = _error(s, {**body, "stream": False})
                    assert status == 429 and err["code"] == "queue_full"
                    r = http.post(s.base_url + "/chat/completions", json={**body, "stream": False})
                    assert r.headers["retry-after"] == "1"
        s.app.state.served.engine.shutdown()
        status, err = _error(s, {**body, "stream": False})
        assert status == 503
        assert httpx.get(s.root_url + "/health").status_code == 503
