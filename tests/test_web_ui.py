"""The web chat in a real headless Chromium against the real server (tiny model, in-process)."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

API_KEY = "test-key-123"
CONDITIONS = ["GPT4 Correct", "Code", "Math Correct"]


@pytest.fixture(scope="module")
def server(tiny_model):
    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), port=0) as handle:
        yield handle


@pytest.fixture(scope="module")
def keyed_server(tiny_model):
    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), port=0, api_keys=[API_KEY]) as handle:
        yield handle


def root(handle) -> str:
    return handle.base_url.rsplit("/v1", 1)[0] + "/"


def open_chat(page, handle, max_tokens: int = 48, temperature: float = 0.0):
    page.goto(root(handle))
    page.wait_for_selector("#condition option", state="attached")
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def wait_reply_done(page, n: int):
    """Wait until the n-th assistant message (1-based) has finished streaming; return its locator."""
    page.wait_for_function("n => document.querySelectorAll('.msg.assistant').length >= n && "
                           "!document.querySelector('.msg.assistant.streaming') && "
                           "!document.querySelector('#send').hidden", arg=n)
    return page.locator(".msg.assistant").nth(n - 1)


def expected_prompt_tokens(tiny_model, user_text: str, condition: str) -> int:
    from ochat.models.tokenizers import load_tokenizer
    from ochat.templates.conversation import conversation_from_openai
    from ochat.templates.encoder import ConversationEncoder

    enc = ConversationEncoder("openchat_3.5", load_tokenizer(tiny_model))
    ids, _ = enc.encode_one(conversation_from_openai([{"role": "user", "content": user_text}]), inference=True,
                            condition=condition)
    return len(ids)


def prompt_tokens_shown(reply) -> int:
    return int(re.search(r"(\d+) prompt tokens", reply.locator(".meta").inner_text()).group(1))


def test_page_and_assets_need_no_key_and_carry_csp(keyed_server):
    with urllib.request.urlopen(root(keyed_server)) as r:
        assert r.status == 200 and "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert b'id="messages"' in r.read()
    for asset in ("chat.js", "chat.css", "vendor/purify.min.js", "vendor/marked.umd.js", "vendor/highlight.min.js"):
        with urllib.request.urlopen(root(keyed_server) + "ui/" + asset) as r:
            assert r.status == 200 and len(r.read()) > 1000


def test_streamed_reply_condition_reaches_server_and_screenshot(page, server, tiny_model, tmp_path):
    open_chat(page, server)
    conditions = page.locator("#condition option").all_inner_texts()
    assert conditions[:3] == CONDITIONS and page.input_value("#condition") == "GPT4 Correct"
    assert "openchat_3.5" in page.inner_text("#model-info")

    # Record every text the streaming reply shows (and whether Stop was offered), to see it grow token by token.
    page.evaluate("""() => { window.__seen = []; window.__stopShown = false;
        new MutationObserver(() => { const el = document.querySelector('.msg.assistant.streaming .content');
                                     if (!el) return;
                                     window.__seen.push(el.textContent.length);
                                     window.__stopShown ||= !document.getElementById('stop').hidden &&
                                                            document.getElementById('send').hidden; })
          .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#max_tokens", "160")
    send(page, "Hello! Write **bold** text")
    reply = wait_reply_done(page, 1)
    seen = [n for n in page.evaluate("window.__seen") if n > 0]
    assert len(set(seen)) >= 3 and seen == sorted(seen), f"reply did not stream: {seen}"
    assert page.evaluate("window.__stopShown")
    assert reply.locator(".content").inner_text().strip()
    assert page.locator(".msg.user .content").inner_text() == "Hello! Write **bold** text"
    gpt4 = prompt_tokens_shown(reply)
    assert gpt4 == expected_prompt_tokens(tiny_model, "Hello! Write **bold** text", "GPT4 Correct")
    assert "GPT4 Correct" in reply.locator(".meta").inner_text()

    # Same message under another condition, in a new conversation: the server's prompt changes.
    page.click("#new-chat")
    page.select_option("#condition", "Code")
    page.fill("#max_tokens", "24")
    send(page, "Hello! Write **bold** text")
    reply = wait_reply_done(page, 1)
    code = prompt_tokens_shown(reply)
    assert code == expected_prompt_tokens(tiny_model, "Hello! Write **bold** text", "Code") != gpt4
    assert "Code" in reply.locator(".meta").inner_text()

    # Settings and both conversations survive a reload (localStorage).
    page.reload()
    page.wait_for_selector("#condition option", state="attached")
    assert page.input_value("#condition") == "Code" and page.input_value("#max_tokens") == "24"
    assert page.locator("#conversations li").count() == 2
    assert page.locator(".msg.assistant").count() == 1
    shot = tmp_path / "web_chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert not page.errors


def test_stop_button_aborts_generation(page, server):
    open_chat(page, server, max_tokens=4000)
    send(page, "Tell me a very long story")
    page.wait_for_function("() => { const el = document.querySelector('.msg.assistant.streaming .content');"
                           " return el && el.textContent.length > 20; }")
    page.click("#stop")
    reply = wait_reply_done(page, 1)
    assert "stopped" in reply.locator(".meta").inner_text()
    partial = reply.locator(".content").inner_text()
    assert partial.strip()
    page.wait_for_timeout(500)
    assert reply.locator(".content").inner_text() == partial   # nothing arrives after stop
    # The server saw the disconnect and freed the slot: nothing running.
    page.wait_for_function("""async (url) => { const t = await (await fetch(url)).text();
        const m = t.match(/^\\S*running\\S*\\s+([0-9.e+]+)$/m); return m && parseFloat(m[1]) === 0; }""",
                           arg=root(server) + "metrics", timeout=10_000)
    # The conversation goes on after a stop.
    page.fill("#max_tokens", "8")
    send(page, "Shorter, please")
    reply = wait_reply_done(page, 2)
    assert "stopped" not in reply.locator(".meta").inner_text()


def test_api_key_field_when_server_requires_keys(page, keyed_server):
    page.goto(root(keyed_server))
    page.wait_for_selector("#api-key-form", state="visible")
    assert "401" in page.inner_text("#error")
    page.fill("#api-key", "wrong-key")
    page.click("#api-key-form button")
    page.wait_for_function("() => document.querySelector('#error-text').textContent.includes('401')")
    assert page.is_visible("#api-key-form")
    page.fill("#api-key", API_KEY)
    page.click("#api-key-form button")
    page.wait_for_selector("#condition option", state="attached")
    assert page.is_hidden("#api-key-form") and page.is_hidden("#error")
    page.fill("#max_tokens", "8")
    send(page, "Hi")
    reply = wait_reply_done(page, 1)
    assert "prompt tokens" in reply.locator(".meta").inner_text()


def test_server_errors_are_shown(page, server):
    open_chat(page, server)
    page.fill("#input", "hello " * 9000)   # longer than the tiny model's 8192-token context
    page.click("#send")
    page.wait_for_selector("#error", state="visible")
    error = page.inner_text("#error-text")
    assert error.startswith("400") and "8192" in error, error
    assert page.locator(".msg.assistant").count() == 0 and page.is_visible("#send")


def test_untrusted_html_never_runs(page, server, tmp_path):
    attack = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    # A stored conversation whose assistant reply carries HTML, as a model could write it.
    stored = [{"id": "c1", "title": attack, "system": "", "created": 0, "messages": [
        {"role": "user", "content": attack},
        {"role": "assistant", "content": "**bold** " + attack
         + '\n<a href="javascript:window.__pwned=3">link</a>\n<iframe src="javascript:parent.__pwned=4"></iframe>'
         + "\n\n```python\ndef f(x):\n    return x + 1\n```\n"}]}]
    page.goto(root(server))
    page.evaluate("s => { localStorage.setItem('ochat.conversations', s); localStorage.setItem('ochat.current', 'c1'); }",
                  json.dumps(stored))
    page.reload()
    page.wait_for_selector(".msg.assistant strong")
    page.fill("#max_tokens", "8")
    send(page, attack)   # typed by the user, and streamed into a live reply
    wait_reply_done(page, 2)
    page.click("#conversations li.active .rename")
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages script, #messages iframe, #messages img[onerror], [onerror]").count() == 0
    assert page.locator("#messages a[href^='javascript']").count() == 0
    assert page.locator(".msg.user .content").first.inner_text() == attack     # shown as text
    assert page.locator(".msg.assistant pre code.hljs .hljs-keyword").count() >= 1   # highlighted code
    assert page.inner_text("#conversations li.active .conv-title") == attack
    page.screenshot(path=str(tmp_path / "web_chat_markdown.png"))
    assert not page.errors


def test_conversations_new_rename_delete(page, server):
    open_chat(page, server, max_tokens=8)
    send(page, "first conversation")
    wait_reply_done(page, 1)
    page.click("#new-chat")
    send(page, "second conversation")
    wait_reply_done(page, 1)
    titles = page.locator("#conversations .conv-title").all_inner_texts()
    assert titles == ["second conversation", "first conversation"]

    page.locator("#conversations li").nth(1).locator(".rename").click()
    page.fill("#conversations li input", "Renamed chat")
    page.keyboard.press("Enter")
    page.once("dialog", lambda d: d.accept())
    page.locator("#conversations li").nth(0).locator(".delete").click()
    page.reload()
    page.wait_for_selector("#conversations li")
    assert page.locator("#conversations .conv-title").all_inner_texts() == ["Renamed chat"]
    assert page.inner_text(".msg.user .content") == "first conversation"   # now the current one
    page.once("dialog", lambda d: d.dismiss())   # cancelled: nothing deleted
    page.locator("#conversations li .delete").click()
    assert page.locator("#conversations li").count() == 1
