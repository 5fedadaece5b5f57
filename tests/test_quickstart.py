"""`ochat quickstart` end to end at a small size, stage reuse, serving with the real `openai` client,
and the synthetic corpus read back by the real data pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ochat.cli import main
from ochat.synthetic.quickstart_corpus import CorpusConfig, make_question, novice_mistake, read_test, write_quickstart_corpus

SMALL = ["--conversations", "200", "--test-questions", "6", "--steps", "3", "--hidden-size", "32",
         "--batch-max-len", "256", "--no-progress"]
STAGES = ["corpus", "data", "model", "train", "accuracy"]


def test_corpus_is_mixed_quality_and_held_out(tmp_path):
    summary = write_quickstart_corpus(tmp_path / "c", CorpusConfig(conversations=300, test_questions=30, seed=1))
    assert summary["expert"] + summary["novice"] == 300 and summary["pages"] > 0 and summary["json_dump"] > 0
    assert 0.3 < summary["wrong_answers"] / summary["answers"] < 0.7
    test = read_test(tmp_path / "c" / "test.jsonl")
    assert len(test) == 30 and {q.task for q in test} == {"capital", "add", "opposite"}
    dump = json.loads((tmp_path / "c" / "sharegpt.json").read_text())
    pages = sorted((tmp_path / "c" / "pages").glob("*.html"))
    assert len(dump) == summary["json_dump"] and len(pages) == summary["pages"]
    corpus_text = (tmp_path / "c" / "sharegpt.json").read_text() + "".join(p.read_text() for p in pages)
    assert not any(q.question in corpus_text for q in test)  # held out: never in the training corpus
    for rec in dump:
        for user, gpt in zip(rec["conversations"][::2], rec["conversations"][1::2]):
            assert user["from"] == "human" and gpt["from"] == "gpt"
    assert "Model: GPT-4" in pages[0].read_text() or "GPT-3.5" in pages[0].read_text()


def test_novice_mistakes_are_systematic():
    import random

    rng = random.Random(0)
    for task in ("capital", "add", "opposite"):
        for _ in range(50):
            q = make_question(task, rng)
            assert novice_mistake(q) != q.answer and novice_mistake(q) == novice_mistake(q)
    q = make_question("capital", random.Random(0), held_out=True)
    assert q.question.startswith("Tell me the capital of")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small `ochat quickstart --no-serve` run shared by the tests below (stderr captured)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["quickstart", "--out", str(out), "--no-serve", *SMALL])
    assert code == 0, err.getvalue()[-3000:]
    return out, err.getvalue()


def test_quickstart_end_to_end(small_run):
    out, err = small_run
    for name in STAGES:
        assert (out / ".stages" / f"{name}.json").exists(), name
        assert f"/{len(STAGES)}] " in err
    assert (out / "corpus" / "sharegpt.json").exists() and any((out / "corpus" / "pages").glob("*.html"))
    assert (out / "data" / "openchat_3.5.train.parquet").exists()
    assert (out / "data" / "openchat_3.5.train.text.jsonl").exists()
    assert (out / "base-model" / "config.json").exists()
    ckpt = out / json.loads((out / ".stages" / "train.json").read_text())["result"]["checkpoint"]
    assert (ckpt / "model.safetensors").exists() and (ckpt / "ochat.json").exists()
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["expert"]["total"] == 6 and acc["expert"]["condition"] == "GPT4 Correct"
    assert acc["novice"]["condition"] == "GPT3"
    assert "held-out exact-match accuracy (greedy, condition 'GPT4 Correct'):" in err
    assert str(out.resolve()) in err and "quickstart finished" in err
    config = json.loads((out / "base-model" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["vocab_size"] == 32001  # Mistral-7B + <|end_of_turn|>
    train_text = (out / "data" / "openchat_3.5.train.text.jsonl").read_text()
    assert "GPT4 Correct Assistant:" in train_text and "GPT3 Assistant:" in train_text  # the condition map


def test_quickstart_rerun_reuses_stages(small_run, tmp_path, capfd):
    import shutil

    out = tmp_path / "qs"
    shutil.copytree(small_run[0], out)
    ckpt = out / json.loads((out / ".stages" / "train.json").read_text())["result"]["checkpoint"]
    mtime = ckpt.joinpath("model.safetensors").stat().st_mtime
    assert main(["quickstart", "--out", str(out), "--no-serve", *SMALL]) == 0
    err = capfd.readouterr().err
    assert err.count("reusing the finished stage") == len(STAGES)
    assert ckpt.joinpath("model.safetensors").stat().st_mtime == mtime
    assert "held-out exact-match accuracy" in err

    # more steps: the earlier stages are reused, training and evaluation run again
    assert main(["quickstart", "--out", str(out), "--no-serve", *SMALL, "--steps", "4"]) == 0
    err = capfd.readouterr().err
    assert err.count("reusing the finished stage") == 3
    assert json.loads((out / ".stages" / "train.json").read_text())["result"]["steps"] == 4


def test_quickstart_serves_and_answers(small_run, tmp_path):
    """The serve stage in a real `ochat quickstart` process (reusing the small run's stages), asked
    through the real `openai` client; Ctrl-C stops it."""
    import shutil

    import openai

    out = tmp_path / "qs"
    shutil.copytree(small_run[0], out)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ochat", "quickstart", "--out", str(out), "--port", str(port),
                             *SMALL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Press Ctrl-C to stop" in text, text[-3000:]
        assert text.count("reusing the finished stage") == len(STAGES)
        assert f"http://127.0.0.1:{port}/" in text and "curl " in text and "openai.OpenAI(" in text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
        reply = client.chat.completions.create(model="openchat_3.5", max_tokens=5,
                                               messages=[{"role": "user", "content": "What is 4 + 7?"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        import urllib.request

        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in page.lower()
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode in (0, 130)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
