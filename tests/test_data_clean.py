"""Reading and cleaning: every malformed case is counted with its file and reason; Markdown as expected."""

import hashlib
import json
from pathlib import Path

import pytest

from ochat.data.clean import CleanOptions, clean_record, clean_text, html_to_markdown, record_hash
from ochat.data.pipeline import run_clean
from ochat.data.sources import RawRecord, iter_json_array, read_file, read_inputs

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def _clean_page(name):
    raw = next(read_file(FIXTURES / "pages" / name))
    return clean_record(raw, CleanOptions())


@pytest.mark.parametrize("name", ["code_blocks", "table_lists"])
def test_page_markdown_matches_expected(name):
    res = _clean_page(f"{name}.html")
    assert res.record is not None, res.reason
    expected = (FIXTURES / "expected" / f"{name}.md").read_text(encoding="utf-8").rstrip("\n")
    assert res.record["items"][1]["content"] == expected


def test_chatgpt_artefacts_removed_and_user_text_kept():
    rec = _clean_page("code_blocks.html").record
    answer = rec["items"][1]["content"]
    for artefact in ("Copy code", "1 / 2", "Copy12 chars", "<span", "hljs"):
        assert artefact not in answer
    # a human turn is plain text: "<my_lang>" is not an HTML tag to strip
    assert rec["items"][0]["content"] == "Write a sum function in <my_lang> please"
    assert _clean_page("table_lists.html").record["items"][0]["content"].startswith('<div class="box">hi</div> is my')
    assert rec["model"] == "Model: GPT-4" and rec["id"] == "code01"
    # FastChat-style flattened code ("```pythonCopy code...") and blank runs are repaired
    assert clean_text("```pythonCopy code\nx_1 = 2\n```\n\n\n\nDone.", "sharegpt_json") == "```python\nx_1 = 2\n```\n\nDone."
    # blank lines inside code blocks survive
    assert html_to_markdown('<pre><code class="language-c">a;\n\n\n\nb;\n</code></pre>') == "```c\na;\n\n\n\nb;\n```"
    # a code block containing ``` gets a longer fence
    assert html_to_markdown("<pre><code>```x```\n</code></pre>").startswith("````\n")


def test_format_checks():
    res = _clean_page("leading_assistant.html")
    assert [m["role"] for m in res.record["items"]] == ["user", "assistant"]
    assert set(res.fixes) == {"dropped_leading_assistant", "dropped_trailing_user"}
    assert _clean_page("not_alternating.html").reason == "roles_not_alternating"
    assert _clean_page("empty_answer.html").reason == "empty_message"
    assert _clean_page("unknown_role.html").reason == "unknown_role"
    assert _clean_page("blocked.html").reason == "blocked_word"
    assert clean_record(next(read_file(FIXTURES / "pages" / "blocked.html")), CleanOptions(())).record is not None
    one = RawRecord("x", "sharegpt_json", "x", [("human", "hi")])
    assert clean_record(one, CleanOptions()).reason == "no_exchange"
    custom = RawRecord("x", "sharegpt_json", "x", [("human", "hi"), ("gpt", "As an AI language model...")])
    assert clean_record(custom, CleanOptions(("as an ai",))).reason == "blocked_word"


def test_hash_is_stable_and_normalised():
    a = {"system": "", "items": [{"role": "user", "content": "What is  2+2? "}, {"role": "assistant", "content": "4"}]}
    b = {"system": "", "items": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    c = {"system": "", "items": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "4"}]}
    assert record_hash(a) == record_hash(b) != record_hash(c)
    # sha256 over "\x1e role \x1f normalised text" per message: the same on every run and machine
    # (Python's salted hash() would not be)
    assert record_hash(b) == "96a5c02bd5ed341c3e97688afcde7c9528edfffe4f5398ec4e30f096905e4ec1"


def test_every_malformed_case_counted_and_inputs_untouched(tmp_path):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURES.rglob("*") if p.is_file()}
    report = run_clean([FIXTURES], tmp_path / "clean.jsonl", workers=2, progress=False)
    steps = report["steps"]
    assert (steps["read"]["in"], steps["read"]["out"]) == (27, 18)
    assert steps["read"]["dropped"] == {"invalid_json": 2, "not_utf8": 2, "bad_field": 1, "empty_file": 2,
                                        "no_next_data": 1, "truncated_html": 1}
    assert (steps["clean"]["in"], steps["clean"]["out"]) == (18, 11)
    assert steps["clean"]["dropped"] == {"unknown_role": 2, "duplicate": 2, "blocked_word": 1, "empty_message": 1,
                                         "roles_not_alternating": 1}
    assert steps["clean"]["fixed"] == {"dropped_leading_assistant": 1, "dropped_trailing_user": 1}
    # every drop is logged with its file (and line / index)
    log = [json.loads(line) for line in (tmp_path / "clean.dropped.jsonl").read_text().splitlines()]
    wheres = {(d["reason"], d["where"].split("data/")[-1]) for d in log}
    assert ("invalid_json", "conversations.jsonl:3") in wheres
    assert ("not_utf8", "conversations.jsonl:6") in wheres
    assert ("invalid_json", "dump_truncated.json[#1]") in wheres
    assert ("unknown_role", "conversations.jsonl:4") in wheres
    assert ("duplicate", "pages/gpt35_copy.html") in wheres
    assert ("not_utf8", "pages/not_utf8.html") in wheres
    assert len(log) == 9 + 7
    ids = [json.loads(line)["id"] for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert ids == ["jl1", "jl3", "dump_md", "dump_html", "dump_flat", "dump_35", "dump_nolabel",
                   "code01", "gpt35a", "lead01", "table01"]
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in FIXTURES.rglob("*") if p.is_file()}


def test_json_array_is_streamed_across_chunks(tmp_path):
    items = [{"id": str(i), "conversations": [{"from": "human", "value": "x" * i}]} for i in range(50)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(items), encoding="utf-8")
    with open(f, "rb") as fh:
        got = list(iter_json_array(fh, chunk_size=7))
    assert [obj for _, obj in got] == items
    f.write_text(json.dumps(items[0]), encoding="utf-8")  # one conversation, not an array
    assert [r.id for r in read_inputs([f])] == ["0"]


def test_mutated_inputs_never_crash(tmp_path):
    """Truncated, bit-flipped and spliced copies of the fixtures are read and cleaned or counted, never raise."""
    import random

    rng = random.Random(0)
    sources = [FIXTURES / "dump.json", FIXTURES / "conversations.jsonl", FIXTURES / "pages" / "code_blocks.html",
               FIXTURES / "pages" / "table_lists.html"]
    for i in range(120):
        src = rng.choice(sources)
        data = bytearray(src.read_bytes())
        op = rng.random()
        if op < 0.4:
            data = data[:rng.randrange(len(data))]
        elif op < 0.7:
            for _ in range(5):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            j = rng.randrange(len(data))
            data[j:j] = rng.choice([b"{", b'"', b"<", b"\\", b"]", b"\xff"])
        f = tmp_path / f"f{i}{src.suffix}"
        f.write_bytes(bytes(data))
    report = run_clean([tmp_path], tmp_path / "out" / "clean.jsonl", workers=1, progress=False)
    assert report["steps"]["read"]["in"] >= 120
