"""`ochat eval answers` against the real in-process `ochat serve` with the tiny model."""

from __future__ import annotations

import glob
import json
import os

import openai
import pytest

from ochat.cli import main
from ochat.evaluation.answers import parse_temperature_map, temperature_for
from ochat.evaluation.files import read_jsonl

KEY = "sk-eval-test"


@pytest.fixture(scope="module")
def server(tiny_model):
    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), port=0, api_keys=[KEY], max_model_len=512) as s:
        yield s


def ask(server, messages, condition=None, max_tokens=8) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY)
    extra = {"condition": condition} if condition else None
    r = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0.0,
                                       max_tokens=max_tokens, extra_body=extra)
    return r.choices[0].message.content


def fastchat_load_model_answers(answer_dir: str) -> dict:
    """FastChat's llm_judge/common.py `load_model_answers`, line for line."""
    filenames = glob.glob(os.path.join(answer_dir, "*.jsonl"))
    filenames.sort()
    model_answers = {}
    for filename in filenames:
        model_name = os.path.basename(filename)[:-6]
        answer = {}
        with open(filename) as fin:
            for line in fin:
                line = json.loads(line)
                answer[line["question_id"]] = line
        model_answers[model_name] = answer
    return model_answers


def mt_questions(shared_data, tmp_path, categories=("math", "writing")):
    rows = [json.loads(x) for x in (shared_data / "fastchat/mt_bench__question.jsonl").read_text().splitlines()]
    picked = [r for c in categories for r in rows if r["category"] == c][:1] + \
        [r for r in rows if r["category"] == categories[-1]][:1]
    p = tmp_path / "question.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return p, picked


def test_temperature_map():
    t = parse_temperature_map(None)
    assert [temperature_for(c, t) for c in ("writing", "roleplay", "stem", "humanities", "math", "coding", "x")] == \
        [0.7, 0.7, 0.1, 0.1, 0.0, 0.0, 0.0]
    t = parse_temperature_map(["writing=0.2", "*=0.5,math=0"])
    assert (temperature_for("writing", t), temperature_for("generic", t), temperature_for("math", t)) == (0.2, 0.5, 0.0)
    from ochat.errors import OchatError
    with pytest.raises(OchatError, match="temperature-map"):
        parse_temperature_map(["writing"])


def test_local_model_mt_bench_two_turns(tiny_model, server, shared_data, tmp_path):
    """--model DIR serves the model in-process; the second turn is asked with the first answer in context."""
    bench, qs = mt_questions(shared_data, tmp_path, ("math", "reasoning"))  # greedy categories
    out = tmp_path / "model_answer" / "tiny.jsonl"
    assert main(["eval", "answers", "--bench", str(bench), "--model", str(tiny_model), "--out", str(out),
                 "--max-tokens", "8", "--parallel", "2"]) == 0
    answers = fastchat_load_model_answers(str(out.parent))
    assert list(answers) == ["tiny"]
    assert sorted(answers["tiny"]) == sorted(q["question_id"] for q in qs)
    for q in qs:
        rec = answers["tiny"][q["question_id"]]
        assert set(rec) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert rec["model_id"] == "tiny" and rec["choices"][0]["index"] == 0
        t1, t2 = rec["choices"][0]["turns"]  # FastChat reads choices[0]["turns"][turn]
        assert t1 and t2
        assert t1 == ask(server, [{"role": "user", "content": q["turns"][0]}])
        with_context = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": t1},
                        {"role": "user", "content": q["turns"][1]}]
        assert t2 == ask(server, with_context)
        assert t2 != ask(server, [{"role": "user", "content": q["turns"][1]}])


def test_api_base_resume_errors_condition(server, shared_data, tmp_path, monkeypatch, capsys):
    """Any OpenAI-compatible endpoint with OPENAI_API_KEY; resume; per-question errors kept apart."""
    rows = [json.loads(x) for x in (shared_data / "openchat_v1/vicuna__question.jsonl").read_text().splitlines()][:3]
    rows.append({"question_id": 999, "text": "word " * 2000, "category": "generic"})  # longer than the context
    bench = tmp_path / "vicuna.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model_answer" / "ochat-code.jsonl"
    args = ["eval", "answers", "--bench", str(bench), "--api-base", server.base_url, "--model-name", server.model_name,
            "--out", str(out), "--max-tokens", "6", "--condition", "Code", "--backoff", "0.01"]

    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    assert main(args + ["--limit", "1"]) == 2
    assert "AuthenticationError" in capsys.readouterr().err

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert main(args + ["--limit", "2"]) == 0
    first = {r["question_id"]: r["answer_id"] for r in read_jsonl(out)}
    assert len(first) == 2
    with open(out, "a") as f:
        f.write('{"question_id": 3, "answer_id": "torn", "cho')  # a run killed mid-line
    assert main(args) == 1  # one question failed
    recs = {r["question_id"]: r for r in read_jsonl(out)}
    assert sorted(recs) == [1, 2, 3]  # the failed question is not written as an answer
    assert all(recs[q]["answer_id"] == a for q, a in first.items())  # resumed, not regenerated
    errors = json.loads((out.parent / "ochat-code.errors.json").read_text())
    assert [e["question_id"] for e in errors] == [999] and "BadRequest" in errors[0]["error"]
    assert errors[0]["attempts"] == 1  # a client error is not retried
    assert list(fastchat_load_model_answers(str(out.parent))) == ["ochat-code"]  # the errors file is not an answer file
    # the condition reached the server: same output as asking with it, different from the default one
    msg = [{"role": "user", "content": rows[0]["text"]}]
    assert recs[1]["choices"][0]["turns"][0] == ask(server, msg, "Code", max_tokens=6)
    assert recs[1]["choices"][0]["turns"][0] != ask(server, msg, None, max_tokens=6)
    # bad input: one-line errors, exit code 2
    assert main(["eval", "answers", "--bench", str(bench), "--out", str(out)]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "prompt": "hi"}\n')
    assert main(["eval", "answers", "--bench", str(bad), "--api-base", server.base_url, "--model-name", "x",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "turns" in err and "Traceback" not in err
