"""`ochat eval bench` (few-shot sets, answer extraction) and `ochat eval alpaca-export`."""

from __future__ import annotations

import json

import pytest

from ochat.cli import main
from ochat.evaluation.fewshot import extract, is_correct
from ochat.evaluation.files import new_answer, read_jsonl


@pytest.mark.parametrize("kind,response,letters,want", [
    ("mc", "Let's think step by step. Paris is in France. So the answer is (B).", "ABCD", "B"),
    ("mc", "A: The answer is C, because ...", "ABCD", "C"),  # the part after "answer is" wins
    ("mc", "(D) is the only option that fits.", "ABCD", "D"),  # AGIEval: first option letter
    ("mc", "I think so too", "ABCD", None),  # "I" is not an option letter
    ("mc", "The answer is (E).", "ABCD", None),
    ("number", "Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72. The answer is 72.", "", "72"),
    ("number", "She pays $1,250.50 in total.\n#### 1,250.50", "", "1250.5"),
    ("number", "3 apples and 4 pears make 7", "", "7"),
    ("number", "no idea", "", None),
    ("text", "Step by step ... So the answer is valid.", "", "valid"),
    ("text", "It is probably valid", "", None),
])
def test_extract(kind, response, letters, want):
    assert extract(kind, response, letters or "ABCDE") == want


def test_is_correct():
    assert is_correct("mc", "B", "(B)") and not is_correct("mc", "A", "B") and not is_correct("mc", None, "A")
    assert is_correct("number", "72", "72.0") and is_correct("number", "1250.5", "1,250.50")
    assert is_correct("text", "Valid", "valid.") and not is_correct("text", "invalid", "valid")


def write_sets(d):
    (d / "bbh").mkdir(parents=True)
    mmlu = [{"question": "Q: 2+2?\n(A) 3 (B) 4 (C) 5 (D) 6\nA: The answer is (B).\n\nQ: Capital of France?\n"
                         "(A) Rome (B) Oslo (C) Paris (D) Bern\nA:", "label": "(C)", "options": ["Rome", "Oslo", "Paris", "Bern"]},
            {"question": "Q: 3*3?\n(A) 6 (B) 9\nA:", "label": "B"}]
    gsm = [{"question": "Q: Tom has 3 apples and buys 4. How many?\nA: 3 + 4 = 7. The answer is 7.\n\nQ: 10 - 3?\nA:",
            "label": 7}, {"question": "Q: 6 * 7?\nA:", "label": "42"}, {"question": "Q: 1 + 1?\nA:", "label": 2}]
    bbh = [{"question": "Is 'x' a letter? Answer valid or invalid.\nA:", "label": "valid"}]
    for name, rows in (("mmlu", mmlu), ("gsm8k", gsm), ("bbh/formal", bbh)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bench_with_tiny_model(tiny_model, tmp_path):
    sets = tmp_path / "sets"
    write_sets(sets)
    out = tmp_path / "out"
    assert main(["eval", "bench", "--eval-sets", str(sets), "--model", str(tiny_model), "--out", str(out),
                 "--max-tokens", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"mmlu", "gsm8k", "bbh/formal"}
    assert [summary["sets"][s]["n"] for s in ("mmlu", "gsm8k", "bbh/formal")] == [2, 3, 1]
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == 6
    for r in results:  # every response was scored by the set's rule; unmatched ones count as wrong
        assert r["error"] is None and isinstance(r["response"], str)
        letters = "ABCD" if r["set"] == "mmlu" and r["index"] == 0 else "ABCDE"
        assert r["predicted"] == extract(r["kind"], r["response"], letters)
        assert r["correct"] == is_correct(r["kind"], r["predicted"], r["label"])
    assert [r["kind"] for r in results if r["set"] == "gsm8k"] == ["number"] * 3
    unmatched = sum(r["predicted"] is None for r in results)
    assert summary["overall"]["unmatched"] == unmatched
    assert summary["overall"]["accuracy"] == sum(r["correct"] for r in results) / 6


def test_bench_bad_set(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.jsonl").write_text('{"question": "q", "label": "B", "kind": "essay"}\n')
    assert main(["eval", "bench", "--eval-sets", str(tmp_path / "s"), "--api-base", "http://127.0.0.1:9/v1",
                 "--model-name", "m"]) == 2
    assert "x.jsonl:1" in capsys.readouterr().err


def test_alpaca_export(shared_data, tmp_path, capsys):
    bench = shared_data / "openchat_v1/vicuna__question.jsonl"
    qs = [json.loads(x) for x in bench.read_text().splitlines()][:3]
    answers = tmp_path / "ochat.jsonl"
    answers.write_text("".join(json.dumps(new_answer(q["question_id"], "ochat-3.5", [f"answer {q['question_id']}"])) + "\n"
                               for q in reversed(qs)))
    out = tmp_path / "alpaca.json"
    assert main(["eval", "alpaca-export", "--answers", str(answers), "--bench", str(bench), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [q["text"] for q in qs]
    assert rows[0] == {"instruction": qs[0]["text"], "output": "answer 1", "generator": "ochat-3.5",
                       "dataset": qs[0]["category"]}
    mt = shared_data / "fastchat/mt_bench__question.jsonl"
    assert main(["eval", "alpaca-export", "--answers", str(answers), "--bench", str(mt), "--out", str(out)]) == 2
    assert "not in" in capsys.readouterr().err
