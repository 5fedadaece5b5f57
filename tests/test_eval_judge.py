"""`ochat eval judge` against a scripted OpenAI-compatible judge (GPT-4 is an outside paid service).

The scripted judge reads the quality hidden in each answer ("QUALITY=7") and has a position bias
(it favours whatever it sees first), so the tests can check that both-order judging cancels it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ochat.cli import main
from ochat.evaluation.files import new_answer, read_jsonl
from ochat.evaluation.prompts import parse_pair_scores, parse_rating, parse_verdict
from ochat.evaluation.scores import pairwise_scores, single_scores, vicuna_scores


class ScriptedJudge:
    """A real HTTP server (uvicorn, 127.0.0.1, ephemeral port) whose replies come from `self.script`."""

    def __init__(self):
        self.calls: list[dict] = []
        self.script = lambda body, n: "no script"
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def completions(request: Request):
            body = await request.json()
            self.calls.append(body)
            reply = self.script(body, len(self.calls))
            if isinstance(reply, tuple):  # (status, message): an error reply
                return JSONResponse({"error": {"message": reply[1], "type": "test", "param": None, "code": None}},
                                    status_code=reply[0])
            return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture(scope="module")
def judge_server():
    s = ScriptedJudge()
    yield s
    s.stop()


@pytest.fixture()
def judge(judge_server):
    judge_server.calls.clear()
    return judge_server


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def qualities(body: dict) -> list[int]:
    return [int(x) for x in re.findall(r"QUALITY=(\d+)", user_text(body))]


def biased_scores(body, n):
    q1, q2 = qualities(body)
    return f"Assistant 1 is clear. Assistant 2 is fine.\nBoth are relevant.\n[{min(10, q1 + 1)}, {q2}]"


def biased_verdict(body, n):
    """Prefers answer A unless B is clearly (2+ points) better: position bias on close calls."""
    text = user_text(body)
    marker = "<<End of the conversation of assistant A>>" if "<<End of the conversation" in text else "<<End of answer A>>"
    a_part, b_part = text.split(marker)  # multi-turn: each conversation holds both turns; the last counts
    qa, qb = [int(x) for x in re.findall(r"QUALITY=(\d+)", a_part)], [int(x) for x in re.findall(r"QUALITY=(\d+)", b_part)]
    a, b = qa[-1], qb[-1]
    return "Comparing the two.\n" + ("[[B]]" if b >= a + 2 else "[[A]]")


def rating(body, n):
    return f"The answer is ok.\nRating: [[{qualities(body)[-1]}]]"


def write_answers(d: Path, model: str, questions: list[dict], quality: int, bad_qid=None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{model}.jsonl", "w") as f:
        for q in questions:
            turns = q.get("turns") or [q["text"]]
            ans = [f"{model} answer to turn {i + 1}. QUALITY={quality}" for i in range(len(turns))]
            f.write(json.dumps(new_answer(q["question_id"], model, ans)) + "\n")


def questions_from(path: Path, n: int, categories=None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if categories:
        rows = [r for r in rows if r["category"] in categories]
    return rows[:n]


@pytest.fixture()
def vicuna_setup(tmp_path, shared_data):
    qs = questions_from(shared_data / "openchat_v1/vicuna__question.jsonl", 80)
    qs = [q for q in qs if q["category"] in ("generic", "coding", "math")][:2] + \
        [q for q in qs if q["category"] == "coding"][:2] + [q for q in qs if q["category"] == "math"][:2]
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in qs))
    answers = tmp_path / "model_answer"
    write_answers(answers, "ochat", qs, 8)
    write_answers(answers, "gpt-3.5-turbo", qs, 6)
    return tmp_path, bench, answers, qs


def judge_args(mode, bench, answers, judge, *extra):
    return ["eval", "judge", "--mode", mode, "--bench", str(bench), "--answers", str(answers),
            "--judge-model", "gpt-4", "--judge-api-base", judge.base_url, "--backoff", "0.01", *extra]


def test_parsers():
    assert parse_pair_scores("long explanation\nwith [1, 2] inside\n[8, 6.5]") == (8.0, 6.5)
    assert parse_pair_scores("8 7\nexplanation after scores") is None  # scores must come last
    assert parse_pair_scores("text\n**[7, 9]**\n") == (7.0, 9.0)
    assert parse_pair_scores("text\n[11, 3]") is None
    assert parse_rating("blah [[3]] ... Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [7]") is None and parse_rating("[[0]]") is None
    assert parse_verdict("A is better [[A]]... final: [[C]]") == "tie"
    assert parse_verdict("[[B]]") == "B" and parse_verdict("A") is None


def test_vicuna_both_orders_cancel_position_bias(vicuna_setup, judge):
    root, bench, answers, qs = vicuna_setup
    judge.script = biased_scores
    assert main(judge_args("vicuna", bench, answers, judge, "--baseline", "gpt-3.5-turbo",
                           "--prompts", str(root.parent / "none.jsonl"))) == 2  # missing prompt file: clear error
    assert main(judge_args("vicuna", bench, answers, judge, "--baseline", "gpt-3.5-turbo")) == 0
    assert len(judge.calls) == 2 * len(qs)
    # Each order shows the model once as Assistant 1 and once as Assistant 2.
    firsts = sorted(qualities(c)[0] for c in judge.calls)
    assert firsts == [6] * len(qs) + [8] * len(qs)
    recs = read_jsonl(root / "model_judgment" / "gpt-4_vicuna.jsonl")
    assert len(recs) == len(qs)
    for r in recs:
        assert r["g1_scores"] == [9, 6] and r["g2_scores"] == [7, 8]
        assert r["model_score"] == 8.5 and r["baseline_score"] == 6.5
    # coding and math questions get their category's prompt
    assert {r["category"]: r["judge"][1] for r in recs}["coding"] == "ochat-vicuna-coding"
    s = vicuna_scores(recs)["ochat"]
    assert s["overall"]["score"] == pytest.approx(100 * 8.5 / 6.5)
    assert s["overall"]["se"] == pytest.approx(0.0) and s["failed"] == 0
    assert set(s["categories"]) == {"generic", "coding", "math"}


def test_vicuna_seed_prompts_retries_and_failures(vicuna_setup, judge, shared_data):
    """The seed's prompt file loads; unparseable replies are retried, then recorded as failed, never scored."""
    root, bench, answers, qs = vicuna_setup
    bad_qid = qs[0]["question_id"]
    flaky_qid = qs[1]["question_id"]
    seen: dict[str, int] = {}

    def script(body, n):
        text = user_text(body)
        seen[text] = seen.get(text, 0) + 1
        if qs[0]["text"] in text:
            return "I refuse to give scores."
        if qs[1]["text"] in text and seen[text] == 1:
            return (500, "judge overloaded") if "QUALITY=8" in text.split("Assistant 2")[0] else "no scores yet"
        return biased_scores(body, n)

    judge.script = script
    args = judge_args("vicuna", bench, answers, judge, "--baseline", "gpt-3.5-turbo", "--retries", "3",
                      "--prompts", str(shared_data / "openchat_v1/vicuna__prompt.jsonl"))
    assert main(args) == 1  # a failed judgment makes the run exit non-zero
    recs = {r["question_id"]: r for r in read_jsonl(root / "model_judgment" / "gpt-4_vicuna.jsonl")}
    assert recs[bad_qid]["error"] and recs[bad_qid]["model_score"] is None
    assert "unparseable" in recs[bad_qid]["error"]
    assert recs[flaky_qid]["error"] is None and recs[flaky_qid]["model_score"] == 8.5
    assert len(judge.calls) == 2 * 3 + 2 * 2 + 2 * (len(qs) - 2)  # bad: 3 tries each order; flaky: 2 tries
    assert "JSON list" in user_text(judge.calls[-1])  # the seed's own wording was used
    s = vicuna_scores(list(recs.values()))["ochat"]
    assert s["failed"] == 1 and s["overall"]["n"] == len(qs) - 1
    # Resume: only the failed question is judged again.
    judge.calls.clear()
    judge.script = biased_scores
    assert main(args) == 0
    assert len(judge.calls) == 2
    recs = read_jsonl(root / "model_judgment" / "gpt-4_vicuna.jsonl")
    assert len(recs) == len(qs) and all(r["error"] is None for r in recs)


def test_resume_after_interruption(vicuna_setup, judge):
    root, bench, answers, qs = vicuna_setup
    judge.script = biased_scores
    args = judge_args("vicuna", bench, answers, judge, "--baseline", "gpt-3.5-turbo")
    assert main(args) == 0
    out = root / "model_judgment" / "gpt-4_vicuna.jsonl"
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # killed while writing line 4
    judge.calls.clear()
    assert main(args) == 0
    assert len(judge.calls) == 2 * (len(qs) - 3)
    assert sorted(r["question_id"] for r in read_jsonl(out)) == sorted(q["question_id"] for q in qs)


@pytest.fixture()
def mt_setup(tmp_path, shared_data):
    qs = questions_from(shared_data / "fastchat/mt_bench__question.jsonl", 2, ["writing"]) + \
        questions_from(shared_data / "fastchat/mt_bench__question.jsonl", 2, ["math"])
    bench = tmp_path / "question.jsonl"
    bench.write_text("".join(json.dumps({k: v for k, v in q.items() if k != "reference"}) + "\n" for q in qs))
    answers = tmp_path / "model_answer"
    write_answers(answers, "strong", qs, 9)
    write_answers(answers, "close", qs, 7)
    write_answers(answers, "gpt-3.5-turbo", qs, 6)
    return tmp_path, bench, answers, qs


def test_single_turns_and_references(mt_setup, judge, shared_data):
    root, bench, answers, qs = mt_setup
    judge.script = rating
    refs = shared_data / "fastchat/mt_bench__reference_answer__gpt-4.jsonl"
    assert main(judge_args("single", bench, answers, judge, "--references", str(refs))) == 0
    assert len(judge.calls) == 3 * len(qs) * 2  # 3 models x questions x 2 turns
    recs = read_jsonl(root / "model_judgment" / "gpt-4_single.jsonl")
    math_ref = json.loads(refs.read_text().splitlines()[0])
    for r in recs:
        want = "ochat-single" + ("-ref" if r["category"] == "math" else "") + ("-multi-turn" if r["turn"] == 2 else "")
        assert r["judge"] == ["gpt-4", want]
    math_prompts = [user_text(c) for c in judge.calls if qs[2]["turns"][0] in user_text(c)]
    ref_text = next(json.loads(x)["choices"][0]["turns"][0] for x in refs.read_text().splitlines()
                    if json.loads(x)["question_id"] == qs[2]["question_id"])
    assert math_prompts and all(ref_text in p for p in math_prompts)
    assert math_ref  # the file is in answer format
    # turn 2 prompts show the first exchange as context
    turn2 = [user_text(c) for c in judge.calls if qs[0]["turns"][1] in user_text(c)]
    assert turn2 and all(qs[0]["turns"][0] in p and "answer to turn 1" in p for p in turn2)
    s = single_scores(recs)
    assert s["strong"]["overall"]["score"] == 9 and s["close"]["turns"]["turn 2"]["score"] == 7
    assert s["gpt-3.5-turbo"]["overall"]["n"] == 2 * len(qs)


def test_single_with_fastchat_prompts_and_failure(mt_setup, judge, shared_data):
    root, bench, answers, qs = mt_setup
    judge.script = lambda body, n: "Rating: [[11]]" if "strong answer to turn 2" in user_text(body) else rating(body, n)
    args = judge_args("single", bench, answers, judge, "--prompts", str(shared_data / "fastchat/judge_prompts.jsonl"),
                      "--references", str(shared_data / "fastchat/mt_bench__reference_answer__gpt-4.jsonl"),
                      "--models", "strong", "--retries", "2")
    assert main(args) == 1
    recs = read_jsonl(root / "model_judgment" / "gpt-4_single.jsonl")
    assert {r["judge"][1] for r in recs} == {"single-v1", "single-math-v1", "single-v1-multi-turn",
                                            "single-math-v1-multi-turn"}
    s = single_scores(recs)["strong"]
    assert s["failed"] == len(qs) and s["overall"]["n"] == len(qs) and "turn 2" not in s["turns"]


def test_pairwise_both_orders_disagreement_is_tie(mt_setup, judge):
    root, bench, answers, qs = mt_setup
    judge.script = biased_verdict
    assert main(judge_args("pairwise-baseline", bench, answers, judge, "--baseline", "gpt-3.5-turbo")) == 0
    recs = read_jsonl(root / "model_judgment" / "gpt-4_pair.jsonl")
    assert len(recs) == 2 * len(qs) * 2 and len(judge.calls) == 2 * len(recs)
    for r in recs:
        if r["model_1"] == "strong":  # 9 vs 6: wins in both orders
            assert (r["g1_winner"], r["g2_winner"], r["winner"]) == ("model_1", "model_1", "model_1")
        else:  # 7 vs 6: the judge prefers whichever is shown first -> orders disagree -> tie
            assert (r["g1_winner"], r["g2_winner"], r["winner"]) == ("model_1", "model_2", "tie")
    s = pairwise_scores(recs, "gpt-3.5-turbo")
    assert "gpt-3.5-turbo" not in s
    assert s["strong"]["overall"]["win_rate"] == 1.0 and s["strong"]["overall"]["score"] == 1.0
    assert s["close"]["overall"]["tie"] == 2 * len(qs) and s["close"]["overall"]["score"] == 0.5
    assert s["close"]["overall"]["se"] == 0.0


def test_pairwise_all(mt_setup, judge):
    root, bench, answers, qs = mt_setup
    judge.script = biased_verdict
    assert main(judge_args("pairwise-all", bench, answers, judge, "--parallel", "4")) == 0
    recs = read_jsonl(root / "model_judgment" / "gpt-4_pair-all.jsonl")
    assert len(recs) == 3 * len(qs) * 2  # 3 pairs
    s = pairwise_scores(recs)
    # strong beats both; close ties base and loses to strong; base ties close and loses to strong
    assert s["strong"]["overall"]["win"] == 4 * len(qs)
    assert s["close"]["overall"]["win"] == 0 and s["close"]["overall"]["tie"] == 2 * len(qs)
    assert s["gpt-3.5-turbo"]["overall"]["loss"] == 2 * len(qs)


def test_bad_input_is_one_line_error(mt_setup, judge, capsys):
    root, bench, answers, qs = mt_setup
    assert main(judge_args("pairwise-baseline", bench, answers, judge)) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(judge_args("vicuna", bench, answers, judge, "--baseline", "nobody")) == 2
    assert main(judge_args("sideways", bench, answers, judge)) == 2
    (answers / "broken.jsonl").write_text('{"question_id": 81, "choices": "nope"}\n')
    assert main(judge_args("single", bench, answers, judge)) == 2
    err = capsys.readouterr().err
    assert "broken.jsonl" in err and "choices" in err and "Traceback" not in err
    assert judge.calls == []
