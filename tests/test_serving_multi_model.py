"""Several models behind one server (`--model DIR:name=NAME ...`), with the real openai client, and the web
chat's compare view in real Chromium: two answers streaming side by side, a vote in the votes file, and
`ochat eval ranking` reading it.

The second model is a LoRA adapter over the tiny model, saved the way `ochat train --lora-r` saves one
(adapter weights plus the tokenizer and ochat.json, no config.json), so serving an adapter as a model of its
own is covered too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
import urllib.request

import openai
import pytest

from ochat.errors import OchatError
from ochat.serving.multi_model import ModelSpec, model_specs, parse_model_spec

API_KEY = "multi-key"


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    for f in tiny_model.iterdir():          # tokenizer and ochat.json, as ochat train writes them
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def server(tiny_model, adapter, tmp_path_factory):
    from ochat.serving.inprocess import start_server

    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    with start_server([f"{tiny_model}:name=base", f"{adapter}:name=mine"], api_keys=[API_KEY],
                      votes_file=str(votes)) as handle:
        handle.votes = votes
        yield handle


def client(server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, model: str, text: str = "Hello there", max_tokens: int = 12, stream: bool = False):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                     max_tokens=max_tokens, temperature=0, stream=stream)


def test_model_spec_parsing():
    assert parse_model_spec("ckpt/ep_4:name=mine") == ModelSpec("ckpt/ep_4", name="mine")
    assert parse_model_spec("base") == ModelSpec("base")
    assert parse_model_spec("d:name=x,model_type=openchat_3.5") == ModelSpec("d", name="x", model_type="openchat_3.5")
    assert parse_model_spec("dir:with:colons") == ModelSpec("dir:with:colons")
    for bad, message in (("d:nme=x", "unknown option 'nme'"), ("d:name=", "needs a value"), (":name=x", "no model")):
        with pytest.raises(OchatError, match=message):
            parse_model_spec(bad)
    with pytest.raises(OchatError, match="name each one"):
        model_specs(["a:name=x", "b"])
    with pytest.raises(OchatError, match="more than one model"):
        model_specs(["a:name=x", "b:name=x"])


def test_each_model_answers_under_its_name_streaming_and_keys(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["base", "mine"]
    answers = {}
    for name in ("base", "mine"):
        r = ask(c, name)
        assert r.model == name and r.choices[0].message.content
        answers[name] = r.choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, name, stream=True) if ch.choices)
        assert streamed == answers[name]
    assert answers["base"] != answers["mine"]           # the adapter is applied
    with pytest.raises(openai.NotFoundError) as e:
        ask(c, "nope")
    assert "'base'" in str(e.value) and "'mine'" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        ask(client(server, "wrong"), "base")


def metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}\{{model_name="{model}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_per_model(server):
    def scrape() -> str:
        req = urllib.request.Request(server.root_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        return urllib.request.urlopen(req, timeout=30).read().decode()

    before = scrape()
    c = client(server)
    used = {"base": ask(c, "base", max_tokens=5).usage.completion_tokens,
            "mine": sum(ask(c, "mine", max_tokens=7).usage.completion_tokens for _ in range(2))}
    after = scrape()
    for name, tokens in used.items():
        assert metric(after, "ochat_generation_tokens_total", name) - metric(before, "ochat_generation_tokens_total",
                                                                               name) == tokens


def test_killed_engine_leaves_the_other_model_answering(server):
    c = client(server)
    engines = {s.name: s.engine for s in server.app.state.models.served}
    victim = engines["mine"]._proc.pid

    async def run():
        ac = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)

        async def stream(model: str) -> str:
            s = await ac.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count"}],
                                                 max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        base_task = asyncio.ensure_future(stream("base"))
        mine_task = asyncio.ensure_future(stream("mine"))
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(base_task, mine_task, return_exceptions=True)

    base_text, mine_result = asyncio.run(run())
    assert isinstance(base_text, str) and base_text       # the other model's stream finished normally
    for _ in range(3):
        assert ask(c, "base").choices[0].message.content
    # The killed engine is restarted by its supervisor; "mine" answers again within a bounded time.
    deadline = time.monotonic() + 120
    while True:
        try:
            if ask(c, "mine").choices[0].message.content:
                break
        except (openai.APIStatusError, openai.APIConnectionError):
            pass
        assert time.monotonic() < deadline, "the killed engine never came back"
        time.sleep(0.5)


def test_compare_view_streams_side_by_side_and_votes(page, server, tmp_path):
    page.set_default_timeout(60_000)
    page.goto(server.root_url + "/")
    page.wait_for_selector("#api-key-form", state="visible")
    page.fill("#api-key", API_KEY)
    page.click("#api-key-form button")
    page.wait_for_selector("#compare-settings", state="visible")
    page.check("#compare")
    page.select_option("#model", "base")
    page.select_option("#model_b", "mine")
    page.fill("#max_tokens", "40")
    page.fill("#temperature", "0")
    # Record when each side's text grows: both must be growing in the same time window (parallel streams).
    page.evaluate("""() => { window.growth = {a: [], b: []};
        new MutationObserver(() => { for (const s of ['a', 'b']) {
            const el = document.querySelector('.msg.compare .side-' + s + ' .content');
            if (el && el.closest('.side').classList.contains('streaming')) window.growth[s].push(performance.now()); } })
        .observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#input", "Write a short poem")
    page.click("#send")
    page.wait_for_selector(".msg.compare .votes:not([hidden])")
    growth = page.evaluate("window.growth")
    assert growth["a"] and growth["b"]
    assert min(growth["b"]) < max(growth["a"]) and min(growth["a"]) < max(growth["b"])   # overlapping streams
    sides = page.locator(".msg.compare .side")
    assert sides.count() == 2
    assert sides.nth(0).locator(".role").text_content() == "A: base"
    assert sides.nth(1).locator(".role").text_content() == "B: mine"
    text_a, text_b = (sides.nth(i).locator(".content").inner_text() for i in (0, 1))
    assert text_a and text_b and text_a != text_b
    page.screenshot(path=str(tmp_path / "compare.png"))
    page.click(".msg.compare .vote-1")
    page.wait_for_selector(".msg.compare .vote-status:has-text('Vote recorded')")
    assert page.locator(".msg.compare .side-a.winner").count() == 1
    votes = [json.loads(line) for line in server.votes.read_text().splitlines()]
    assert len(votes) == 1
    v = votes[0]
    assert (v["model_1"], v["model_2"], v["winner"]) == ("base", "mine", "model_1")
    assert v["messages"][-1] == {"role": "user", "content": "Write a short poem"}
    assert v["answer_1"] and v["answer_2"] and v["answer_1"] != v["answer_2"]
    assert page.errors == []
    # The ranking command reads the votes file the page wrote.
    from ochat.cli import main

    out = tmp_path / "ranking.json"
    assert main(["eval", "ranking", str(server.votes), "--out", str(out), "--rounds", "20"]) == 0
    ranking = json.loads(out.read_text())["ranking"]
    assert [r["model"] for r in ranking] == ["base", "mine"] and ranking[0]["wins"] == 1
