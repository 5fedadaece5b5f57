"""`ochat chat` driven through a pseudo-terminal, in-process (--model DIR) and against a running server."""

from __future__ import annotations

import json
import os
import signal
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import pexpect

PROMPT = "You: "
API_KEY = "cli-test-key"


def spawn(args: list[str], cwd: Path):
    env = {**os.environ, "OCHAT_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    # Started with SIGINT ignored, as a background job of a non-interactive shell is: Ctrl-C must work anyway.
    child = pexpect.spawn(sys.executable, ["-m", "ochat", "chat", *args], cwd=str(cwd), env=env,
                          encoding="utf-8", timeout=90, dimensions=(40, 120),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.logfile_read = open(cwd / "tty.log", "a", encoding="utf-8")
    return child


def saved(path: Path) -> dict:
    return json.loads(path.read_text())


def expected_prompt_tokens(model_dir: Path, messages: list[dict], condition: str) -> int:
    from ochat.models.tokenizers import load_tokenizer
    from ochat.templates.conversation import conversation_from_openai
    from ochat.templates.encoder import ConversationEncoder

    enc = ConversationEncoder("openchat_3.5", load_tokenizer(model_dir))
    return len(enc.encode_one(conversation_from_openai(messages), inference=True, condition=condition)[0])


def test_in_process_chat_commands(tiny_model, tmp_path):
    child = spawn(["--model", str(tiny_model), "--temperature", "0", "--max-tokens", "12", "--condition", "Code",
                   "--system", "Be brief.", "--debug"], tmp_path)
    child.expect(PROMPT)
    child.sendline("Hi \\")                    # a trailing backslash continues the message
    child.expect(r"\.\.\.  ")
    child.sendline("there")
    child.expect(r"prompt \((\d+) tokens\)")    # --debug: the prompt tokens, counted here ...
    local = int(child.match.group(1))
    child.expect(r"(\d+) prompt tokens, (\d+) generated; first token \d+ ms; [\d.]+ tokens/s")   # ... and by the server
    assert int(child.match.group(1)) == local == expected_prompt_tokens(
        tiny_model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \nthere"}], "Code")
    assert int(child.match.group(2)) == 12
    child.expect(PROMPT)

    child.sendline("!!save first.json")
    child.expect("saved 2 messages")
    first = saved(tmp_path / "first.json")
    assert first["items"][0] == {"role": "user", "content": "Hi \nthere"}
    assert first["items"][1]["role"] == "assistant" and first["items"][1]["content"]
    assert (first["condition"], first["system"]) == ("Code", "Be brief.")

    child.sendline("!!regen")                   # greedy: the same reply again, replacing the old one
    child.expect("tokens/s")
    child.expect(PROMPT)
    child.sendline("!!save regen.json")
    child.expect("saved 2 messages")
    assert saved(tmp_path / "regen.json")["items"] == first["items"]

    child.sendline("!!reset")
    child.expect("conversation reset")
    child.sendline("!!save reset.json")
    child.expect("saved 0 messages")
    assert saved(tmp_path / "reset.json")["items"] == []

    child.sendline("!!load first.json")
    child.expect("loaded 2 messages")
    child.sendline("and more")
    child.expect(r"prompt \((\d+) tokens\)")
    assert int(child.match.group(1)) > local
    child.expect(PROMPT)
    child.sendline("!!save more.json")
    child.expect("saved 4 messages")
    more = saved(tmp_path / "more.json")["items"]
    assert more[:2] == first["items"] and more[2] == {"role": "user", "content": "and more"}

    child.sendintr()                            # Ctrl-C at the prompt: SIGINT reaches the chat, not the server thread
    child.expect("Ctrl-C clears the line")
    child.expect(PROMPT)
    child.sendline("!!load missing.json")        # a bad file is one line of error, and the chat goes on
    child.expect(r"error: .*missing\.json: no such file")
    child.sendline("!!exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (tmp_path / "tty.log").read_text()


@pytest.fixture(scope="module")
def keyed_server(tiny_model):
    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), port=0, api_keys=[API_KEY]) as handle:
        yield handle


def running_requests(handle) -> float:
    req = urllib.request.Request(handle.base_url.rsplit("/v1", 1)[0] + "/metrics",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    text = urllib.request.urlopen(req).read().decode()
    return sum(float(m) for m in re.findall(r"^\S*running\S*\s+([0-9.e+]+)$", text, re.M))


def test_remote_chat_ctrl_c_stops_reply_not_chat(keyed_server, tmp_path):
    child = spawn(["--api-base", keyed_server.base_url, "--api-key", API_KEY, "--model", keyed_server.model_name,
                   "--max-tokens", "4000", "--plain"], tmp_path)
    child.expect(PROMPT)
    child.sendline("Tell me a long story")
    child.expect("Assistant:")
    time.sleep(1.0)                              # let some of the reply stream in
    child.sendintr()                             # Ctrl-C: stop this reply ...
    child.expect(r"\[stopped\]")
    child.expect(PROMPT)                         # ... but stay in the chat
    deadline = time.time() + 10
    while running_requests(keyed_server) and time.time() < deadline:   # the server aborted the request
        time.sleep(0.2)
    assert running_requests(keyed_server) == 0

    child.sendintr()                             # Ctrl-C at the prompt does not leave either
    child.expect("Ctrl-C clears the line")
    child.expect(PROMPT)
    child.sendline("!!save story.json")
    child.expect("saved 2 messages")
    items = saved(tmp_path / "story.json")["items"]
    assert items[0]["content"] == "Tell me a long story" and items[1]["content"]   # the partial reply is kept

    child.sendline("!!unknown")
    child.expect("!!exit")                       # the help line
    child.sendeof()                              # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_remote_chat_bad_key_is_one_line_error(keyed_server, tmp_path):
    child = spawn(["--api-base", keyed_server.base_url, "--api-key", "wrong"], tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    out = (tmp_path / "tty.log").read_text()
    assert child.exitstatus == 2 and "401" in out and "Traceback" not in out, out


def test_chat_needs_a_model_or_a_server(capsys, tmp_path):
    from ochat.cli import main

    assert main(["chat"]) == 2
    assert main(["chat", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "give --model DIR" in err and "not a directory" in err and "Traceback" not in err
