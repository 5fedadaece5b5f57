"""Completions scoring as vLLM does it (issue 20), with the real `openai` client: echo + logprobs returns
the prompt's token log-probabilities (equal to transformers' in fp32), max_tokens=0 scores without
generating, token-id prompts; GET /v1/models/{id}; /tokenize and /detokenize; the OpenAPI document."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch


PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server(scoring_server):
    return scoring_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt_ids(server) -> list[int]:
    r = httpx.post(server.root_url + "/tokenize", json={"model": server.model_name, "prompt": PROMPT})
    return r.json()["tokens"]


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_ids) -> list[float]:
    """Each prompt token's log-probability after the ones before it, by transformers directly (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, t].item() for i, t in enumerate(prompt_ids) if i > 0]


def test_echo_scores_the_prompt_like_transformers(client, server, prompt_ids, reference):
    r = client.completions.create(model=server.model_name, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(prompt_ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == pytest.approx(value) and len(top) in (2, 3)    # top 2 plus the token itself
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # lm-eval's log-likelihood request: one generated token after the echoed prompt.
    one = client.completions.create(model=server.model_name, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                    temperature=0).choices[0]
    assert len(one.logprobs.token_logprobs) == len(prompt_ids) + 1
    assert one.logprobs.token_logprobs[1:-1] == pytest.approx(reference, abs=1e-4)
    assert one.text.startswith(PROMPT) and one.logprobs.text_offset[-1] == sum(len(t) for t in one.logprobs.tokens[:-1])


def test_token_id_prompts(client, server, prompt_ids, reference):
    by_text = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=server.model_name, prompt=prompt_ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(prompt_ids)
    short = prompt_ids[:4]
    batch = client.completions.create(model=server.model_name, prompt=[prompt_ids, short], echo=True, logprobs=0,
                                      max_tokens=0)
    first, second = sorted(batch.choices, key=lambda c: c.index)
    assert first.logprobs.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    assert second.logprobs.token_logprobs[1:] == pytest.approx(reference[:3], abs=1e-4)
    assert batch.usage.prompt_tokens == len(prompt_ids) + 4
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=server.model_name, prompt=[10**8], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=0)


def test_streamed_echo_with_logprobs_matches_full(client, server):
    full = client.completions.create(model=server.model_name, prompt=PROMPT, echo=True, logprobs=1, max_tokens=4,
                                     temperature=0).choices[0]
    chunks = [c for c in client.completions.create(model=server.model_name, prompt=PROMPT, echo=True, logprobs=1,
                                                   max_tokens=4, temperature=0, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == full.text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert values[0] is None and values[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-5)


def test_retrieve_model(client, server, tiny_model):
    assert client.models.retrieve(server.model_name).id == server.model_name
    assert client.models.retrieve(tiny_model.name).id == server.model_name        # an alias: the same card
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_tokenize_and_detokenize(client, server):
    root = server.root_url
    messages = [{"role": "user", "content": "Count my tokens"}]
    r = httpx.post(root + "/tokenize", json={"model": server.model_name, "messages": messages,
                                             "return_token_strs": True}).json()
    chat = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=1)
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) == chat.usage.prompt_tokens
    assert r["max_model_len"] == 512
    plain = httpx.post(root + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert httpx.post(root + "/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": PROMPT}
    bad = httpx.post(root + "/detokenize", json={"tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_openapi_describes_bodies_and_responses(server):
    doc = httpx.get(server.root_url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"model", "messages", "temperature", "stream"} <= set(schemas[ref]["properties"])
    assert schemas[ref]["required"] == ["model", "messages"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in schemas[completion["$ref"].rsplit("/", 1)[1]]["properties"]
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "422" not in str(doc["paths"])
    for path in ("/v1/models", "/v1/models/{model_id}", "/tokenize", "/detokenize", "/health"):
        assert path in doc["paths"]
