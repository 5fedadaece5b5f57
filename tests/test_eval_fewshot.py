"""`ochat eval fewshot`: lm-evaluation-harness itself against a real `ochat serve` (the app and engine that
`ochat serve` runs, in this process) with a tiny model trained here to count; and `ochat eval alpaca-export`.

Multiple choice by log-likelihood (`local-completions`, token-id and text prompts) must score every choice
as transformers does on the same weights, so the accuracies are equal; generation goes through
`local-chat-completions` and lm-eval's gsm8k filters."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ochat.cli import main
from ochat.evaluation.files import new_answer, read_jsonl
from ochat.training.train import TrainArgs, train
from training_data import NAMES, counting_conversations, write_conversations

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def counting_model(small_model, tmp_path_factory):
    """The training tests' small Llama after a few epochs of "NAME asks: count up from N" -> "N+1 ... N+4"."""
    d = tmp_path_factory.mktemp("fewshot")
    write_conversations(small_model, d / "d.train.parquet", counting_conversations(200, 0, names=NAMES[:15]))
    return train(TrainArgs(model=small_model, data=str(d / "d"), save=d / "out", epochs=4, batch_max_len=256,
                           lr=3e-3, state_every=0, save_every=1000, progress=False))


@pytest.fixture(scope="module")
def server(counting_model):
    from ochat.serving.inprocess import start_server

    with start_server(str(counting_model), dtype="float32") as s:  # fp32: exact scores to compare
        yield s


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Held-out names; four choices per question (the right count and three shifted ones, shuffled)."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc, gen = [], []
    for c in counting_conversations(12, 1, names=NAMES[15:]):
        q, a = c.items[0].content, c.items[1].content
        first = int(a.split()[0])
        choices = [" ".join(str(first + shift + k) for k in range(4)) for shift in (0, 1, 2, 3)]
        rng.shuffle(choices)
        mc.append({"question": q, "choices": choices, "answer": choices.index(a)})
        gen.append({"question": q, "answer": f"{a}\n#### {a.split()[-1]}"})
    for name, rows in (("count_mc", mc), ("count_gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def transformers_loglikelihoods(model_dir, pairs: list[tuple[str, str]]) -> list[float]:
    """log p(continuation | context), split into tokens as lm-eval does (whole text, then the context)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces to the continuation
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    return out


@pytest.mark.parametrize("requests", ["--tokenized-requests", "--text-requests"])
def test_multiple_choice_accuracy_equals_transformers(server, counting_model, tasks, tmp_path, requests):
    out = tmp_path / "eval" / "fewshot" / "counting.json"
    assert main(["eval", "fewshot", "--mc", str(tasks / "count_mc.jsonl"), "--api-base", server.base_url,
                 "--model-name", server.model_name, "--tokenizer", str(counting_model), requests,
                 "--num-fewshot", "2", "--out", str(out)]) == 0
    [score] = json.loads(out.read_text())["scores"]
    assert (score["task"], score["metric"], score["n"]) == ("count_mc", "acc", 12)
    samples = read_jsonl(out.with_suffix(".samples.jsonl"))
    assert len(samples) == 12
    pairs = [tuple(arg[:2]) for s in samples for arg in s["arguments"]]
    assert all(p[0].count("Answer:") == 3 for p in pairs)  # two few-shot examples, then the question
    direct = transformers_loglikelihoods(counting_model, pairs)
    served = [r[0][0] for s in samples for r in s["resps"]]
    assert served == pytest.approx(direct, abs=1e-3)
    correct = [max(range(4), key=lambda k: direct[4 * i + k]) == s["doc"]["answer"] for i, s in enumerate(samples)]
    assert score["value"] == sum(correct) / 12


def test_generation_task_and_report(server, tasks, tmp_path, capsys):
    out = tmp_path / "eval" / "fewshot" / "counting.json"
    # (`--model DIR` serves the model in-process through the same `endpoint` as `ochat eval answers --model`)
    assert main(["eval", "bench", "--gen", str(tasks / "count_gen.jsonl"), "--api-base", server.base_url,  # old name
                 "--model-name", server.model_name, "--num-fewshot", "0", "--max-tokens", "12", "--out", str(out)]) == 0
    scores = {s["filter"]: s for s in json.loads(out.read_text())["scores"]}
    assert scores["strict-match"]["value"] == 0.0  # the model never writes "#### N"
    assert scores["flexible-extract"]["value"] >= 0.75  # it counts (chance: ~0)
    samples = [s for s in read_jsonl(out.with_suffix(".samples.jsonl")) if s["filter"] == "flexible-extract"]
    assert len(samples) == 12 and all(s["resps"][0][0].strip() for s in samples)
    capsys.readouterr()
    assert main(["eval", "report", str(tmp_path / "eval")]) == 0
    md = (tmp_path / "eval" / "report" / "report.md").read_text()
    assert "| count_gen | exact_match | flexible-extract |" in md and "counting" in md


def test_fewshot_bad_input(tasks, tmp_path, capsys):
    assert main(["eval", "fewshot", "--mc", str(tmp_path / "missing.jsonl"), "--api-base", "http://127.0.0.1:9/v1",
                 "--model-name", "m"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", "fewshot", "--mc", str(tasks / "count_mc.jsonl"), "--api-base", "http://127.0.0.1:9/v1",
                 "--model-name", "m"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_alpaca_export(shared_data, tmp_path, capsys):
    bench = shared_data / "openchat_v1/vicuna__question.jsonl"
    qs = [json.loads(x) for x in bench.read_text().splitlines()][:3]
    answers = tmp_path / "ochat.jsonl"
    answers.write_text("".join(json.dumps(new_answer(q["question_id"], "ochat-3.5", [f"answer {q['question_id']}"])) + "\n"
                               for q in reversed(qs)))
    out = tmp_path / "alpaca.json"
    assert main(["eval", "alpaca-export", "--answers", str(answers), "--questions", str(bench), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [q["text"] for q in qs]
    assert rows[0] == {"instruction": qs[0]["text"], "output": "answer 1", "generator": "ochat-3.5",
                       "dataset": qs[0]["category"]}
    mt = shared_data / "fastchat/mt_bench__question.jsonl"
    assert main(["eval", "alpaca-export", "--answers", str(answers), "--bench", str(mt), "--out", str(out)]) == 2
    assert "not in" in capsys.readouterr().err
