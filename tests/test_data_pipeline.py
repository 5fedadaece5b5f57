"""End to end: raw pages / dumps / JSONL -> Parquet whose ids and weights are `ochat template encode`'s."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from ochat.data.pipeline import run_pipeline
from ochat.synthetic.sharegpt_pages import write_pages
from ochat.data.tokenized import read_tokenized
from ochat.models.tokenizers import prepare_tokenizer, save_tokenizer, tokenizer_fingerprint
from ochat.templates import ConversationEncoder, get_model_type, parse_conversation

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def ochat(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ochat", *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, _mistral_tokenizer):
    """The Mistral tokenizer with OpenChat 3.5's end-of-turn token, saved as a HF directory."""
    import copy

    tok = copy.deepcopy(_mistral_tokenizer)
    prepare_tokenizer(tok, get_model_type("openchat_3.5"))
    out = tmp_path_factory.mktemp("tok") / "openchat_3.5"
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory, tok_dir):
    """`ochat data pipeline` on every fixture, through the CLI (in this process: a subprocess would
    spend its time importing torch; `ochat template encode` below runs as one)."""
    import contextlib
    import io
    import types

    from ochat.cli import main

    out = tmp_path_factory.mktemp("pipe")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["data", "pipeline", str(FIXTURES), "--out", str(out), "--model-type", "openchat_3.5",
                     "--tokenizer", str(tok_dir), "--condition-map", "GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1",
                     "--eval-ratio", "0.2", "--legacy-json", "--no-progress"])
    assert code == 0, err.getvalue()
    return out, types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def test_pipeline_outputs_and_counts(fixture_run, tok_dir):
    out, r = fixture_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"openchat_3.5.{n}" for n in (
        "train.parquet", "eval.parquet", "train.text.jsonl", "eval.text.jsonl", "report.json", "dropped.jsonl",
        "train.json", "eval.json", "train.text.json", "eval.text.json"))
    assert "duplicate" in r.stderr and "no_next_data" in r.stderr  # the drop table
    report = json.loads((out / "openchat_3.5.report.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["read", "clean", "filter", "split", "fit", "tokenize"]
    assert (steps["clean"]["out"], steps["filter"]["out"]) == (11, 10)
    assert steps["filter"]["dropped"] == {"no_model_label": 1}
    assert steps["tokenize"]["out"] == 10
    assert report["outputs"]["train"]["rows"] + report["outputs"]["eval"]["rows"] == 10
    assert report["outputs"]["eval"]["rows"] == 2  # round(10 * 0.2)
    train, meta = read_tokenized(out / "openchat_3.5.train.parquet")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert meta["model_type"] == "openchat_3.5" and meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert meta["ochat_version"]
    # the text JSONL: one line per Parquet row, same order, decoded text, canonical conversation
    lines = [json.loads(x) for x in (out / "openchat_3.5.train.text.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == train.column("id").to_pylist()
    for line, tokens in zip(lines, train.column("tokens").to_pylist()):
        assert set(line) >= {"id", "text", "conversation"}
        assert line["text"] == tok.decode(tokens)
        parse_conversation(line["conversation"])
    # C-RLFT labels: GPT-3.5 answers weigh 0.1, GPT-4 answers 1.0
    by_id = {row["id"]: row for row in train.to_pylist()}
    if "dump_35" in by_id:
        assert by_id["dump_35"]["condition"] == "GPT3" and max(by_id["dump_35"]["weights"]) == pytest.approx(0.1)
    conds = set(train.column("condition").to_pylist())
    assert conds <= {"GPT4", "GPT3"} and "GPT4" in conds
    # legacy v1 layout
    legacy = json.loads((out / "openchat_3.5.train.json").read_text())
    assert legacy[0][0] == train.column("tokens")[0].as_py()
    assert legacy[0][1] == [w > 0 for w in train.column("weights")[0].as_py()]
    assert len(json.loads((out / "openchat_3.5.train.text.json").read_text())) == train.num_rows


def test_tokens_equal_template_encode(fixture_run, tok_dir, tmp_path):
    out, _ = fixture_run
    rows = []
    for split in ("train", "eval"):
        table, _ = read_tokenized(out / f"openchat_3.5.{split}.parquet")
        texts = [json.loads(x) for x in (out / f"openchat_3.5.{split}.text.jsonl").read_text().splitlines()]
        rows += [(t, row) for t, row in zip(texts, table.to_pylist())]
    code = next((t, row) for t, row in rows if t["id"] == "code01")
    conv_file = tmp_path / "conv.json"
    conv_file.write_text(json.dumps(code[0]["conversation"]))
    r = ochat("template", "encode", "--model-type", "openchat_3.5", "--tokenizer", tok_dir, "--input", conv_file)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"tokens": code[1]["tokens"], "weights": code[1]["weights"]}
    # and every other row, in process
    enc = ConversationEncoder("openchat_3.5", AutoTokenizer.from_pretrained(tok_dir))
    for text, row in rows:
        tokens, weights = enc.encode_one(parse_conversation(text["conversation"]))
        assert (tokens, weights) == (row["tokens"], pytest.approx(row["weights"]))


def test_mistral_common_and_models_filter(tmp_path, tok_dir):
    report = run_pipeline([FIXTURES / "dump.json", FIXTURES / "conversations.jsonl"], tmp_path, "openchat_3.5",
                          "mistral-common", models="GPT-4", workers=1, progress=False)
    assert report["added_special_tokens"] == ["<|end_of_turn|>"]
    assert report["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tok_dir))
    assert report["steps"]["filter"]["dropped"] == {"model_not_selected": 1, "no_model_label": 1}
    assert report["steps"]["filter"]["out"] == 5
    table = pq.read_table(tmp_path / "openchat_3.5.train.parquet")
    assert set(table.column("condition").to_pylist()) == {""}


def test_bad_arguments_one_line_errors(tmp_path, tok_dir, capsys):
    from ochat.cli import main

    for args, msg in [
        (["nope.json"], "no such file"),
        ([FIXTURES, "--condition-map", "GPT-4=GPT4:x"], "--condition-map"),
        ([FIXTURES, "--eval-ratio", "2"], "--eval-ratio"),
        ([FIXTURES, "--fit", "squash"], "--fit"),
    ]:
        code = main(["data", "pipeline", *map(str, args), "--out", str(tmp_path / "o"), "--model-type", "openchat_3.5",
                     "--tokenizer", str(tok_dir), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and err.count("\n") == 1, err
    code = main(["data", "pipeline", str(FIXTURES), "--out", str(tmp_path / "o"), "--model-type", "gpt5",
                 "--tokenizer", str(tok_dir)])
    assert code == 2 and "unknown model type" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "o").glob("*")] if (tmp_path / "o").exists() else True


def test_killed_run_leaves_no_partial_output(tmp_path, tok_dir):
    pages = write_pages(tmp_path / "pages", 80, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    old = out / "openchat_3.5.train.parquet"
    old.write_bytes(b"previous result")
    args = [sys.executable, "-m", "ochat", "data", "pipeline", str(pages), "--out", str(out),
            "--model-type", "openchat_3.5", "--tokenizer", str(tok_dir), "--models", "any", "--workers", "2",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the run is writing into its work folder
        work = list(out.glob(".openchat_3.5.pipeline-*.tmp"))
        if work and any(f.stat().st_size > 0 for f in work[0].iterdir() if f.is_file()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert old.read_bytes() == b"previous result"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["openchat_3.5.train.parquet"]
    # a re-run starts clean: the stale work folder is removed, the outputs replaced
    report = run_pipeline([pages], out, "openchat_3.5", tok_dir, models="any", workers=1, progress=False)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert pq.read_table(old).num_rows == report["outputs"]["train"]["rows"] > 0
    assert report["steps"]["read"]["in"] == 80


def test_dummy_conversation_through_pipeline(shared_data, tmp_path, tok_dir):
    src = shared_data / "fastchat" / "dummy_conversation.json"
    n_in = len(json.loads(src.read_text()))
    report = run_pipeline([src], tmp_path, "vicuna_v1.1", tok_dir, models="any", workers=2, progress=False)
    s = report["steps"]
    assert s["read"]["in"] == n_in == 500
    assert s["clean"]["in"] == 500 and s["clean"]["out"] + sum(s["clean"]["dropped"].values()) == 500
    assert report["fit_mode"] == "split"
    n = s["split"]["out"]
    assert report["outputs"]["eval"]["rows"] == round(n * 0.01)
    table, meta = read_tokenized(tmp_path / "vicuna_v1.1.train.parquet")
    assert meta["model_type"] == "vicuna_v1.1" and table.num_rows + report["outputs"]["eval"]["rows"] == n
    assert max(table.column("length").to_pylist()) <= 2048


def test_single_steps_chain_equals_pipeline(fixture_run, tok_dir, tmp_path):
    """clean -> filter -> fit -> split -> tokenize, one subcommand each, gives the pipeline's rows."""
    from ochat.data.pipeline import run_clean, run_filter, run_fit, run_split, run_tokenize

    cmap = "GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1"
    kw = dict()
    run_clean([FIXTURES], tmp_path / "clean.jsonl", workers=1, progress=False, **kw)
    run_filter([tmp_path / "clean.jsonl"], tmp_path / "filtered.jsonl", condition_map=cmap, **kw)
    run_fit([tmp_path / "filtered.jsonl"], tmp_path / "fit.jsonl", "openchat_3.5", tok_dir, workers=1,
            progress=False, **kw)
    rep = run_split([tmp_path / "fit.jsonl"], tmp_path / "split", eval_ratio=0.2, **kw)
    assert rep["steps"]["split"]["notes"] == {"train": 8, "eval": 2}
    run_tokenize(tmp_path / "split.train.jsonl", tmp_path / "split.eval.jsonl", tmp_path / "tok", "openchat_3.5",
                 tok_dir, workers=1, progress=False, **kw)
    assert (tmp_path / "clean.report.json").exists() and (tmp_path / "fit.report.json").exists()
    out, _ = fixture_run
    for split in ("train", "eval"):
        a = pq.read_table(out / f"openchat_3.5.{split}.parquet").select(["id", "condition", "tokens", "weights"])
        b = pq.read_table(tmp_path / "tok" / f"openchat_3.5.{split}.parquet").select(["id", "condition", "tokens",
                                                                                       "weights"])
        assert a.to_pylist() == b.to_pylist()


def test_rerun_with_outputs_inside_the_input_folder(tmp_path, tok_dir):
    import shutil

    shutil.copy(FIXTURES / "dump.json", tmp_path / "dump.json")
    first = run_pipeline([tmp_path], tmp_path, "openchat_3.5", tok_dir, models="any", workers=1, progress=False)
    second = run_pipeline([tmp_path], tmp_path, "openchat_3.5", tok_dir, models="any", workers=1, progress=False)
    assert first["steps"]["read"]["in"] == second["steps"]["read"]["in"] == 6
    assert first["outputs"]["train"]["rows"] == second["outputs"]["train"]["rows"] == 5 - first["outputs"]["eval"]["rows"]
