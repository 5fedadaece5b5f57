"""Hostile and malformed inputs: each is skipped and counted with its file, line and reason, in
bounded time, and the run goes on; outputs never replace inputs; a run that keeps nothing says why."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from ochat.data.clean import html_to_markdown
from ochat.data.pipeline import run_clean
from ochat.data.sources import Limits
from ochat.synthetic.sharegpt_pages import page_html

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GOOD = [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "<p>It is <code>4</code>.</p>"}]


def _conv(id_, value=None):
    value = f"<p>Answer <code>{id_}</code>.</p>" if value is None else value
    return {"id": id_, "conversations": [{"from": "human", "value": f"Question {id_}"}, {"from": "gpt", "value": value}]}


def _write_hostile(d: Path) -> dict[str, tuple[str, str]]:
    """The hostile set; returns {where suffix: (step, reason)} of every record that must be dropped."""
    jsonl = [
        json.dumps(_conv("ok1")),
        json.dumps(_conv("surrogate", "x")).replace('"x"', '"\\ud83d half an emoji"'),  # lone UTF-16 half
        '{"id": "bigint", "conversations": [], "views": ' + "9" * 5000 + "}",  # a 5,000-digit integer
        "[" * 50_000 + "]" * 50_000,  # nested 50,000 deep
        json.dumps(_conv("nan_weight")).replace('"gpt",', '"gpt", "weight": NaN,'),
        json.dumps({"id": "role", "conversations": [{"from": "x" * 10_000, "value": "a"}, GOOD[1]]}),
        json.dumps(_conv("huge_message", "<p>" + "y" * 1_100_000 + "</p>")),  # over --max-message-chars
        json.dumps(_conv("ok2")),
    ]
    (d / "hostile.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    dump = ("[" + json.dumps(_conv("d_ok1")) + ", " + "[" * 50_000 + "]" * 50_000 + ", "
            + '{"id": "d_big", "x": "' + "z" * (20 << 20) + '"}, '  # 20 MB element: over --max-record-mb 16
            + '{"id": "d_int", "n": ' + "7" * 5000 + "}, " + json.dumps(_conv("d_ok2")) + "]")
    (d / "hostile_dump.json").write_text(dump, encoding="utf-8")
    # quadratic before: unclosed <pre> / <svg> / <script>; each message is about 200 KB
    for name, value in {"pre": "<p>a</p>" + "<pre>" * 40_000, "svg": "<p>a</p>" + "<svg>" * 40_000,
                        "button": "<div>b" + "<button>" * 25_000}.items():
        (d / f"unclosed_{name}.html").write_text(page_html(name, "Model: GPT-4", [GOOD[0], {"from": "gpt",
                                                                                             "value": value}]))
    (d / "scripts.html").write_text("<html>" + "<script id=" * 40_000, encoding="utf-8")
    big = page_html("big", "Model: GPT-4", GOOD)
    (d / "big.html").write_text(big + "<!--" + "p" * (50 << 20) + "-->", encoding="utf-8")  # a 50 MB page
    return {"hostile.jsonl:2": ("clean", "bad_text"), "hostile.jsonl:3": ("read", "invalid_json"),
            "hostile.jsonl:4": ("read", "too_deep"), "hostile.jsonl:5": ("clean", "bad_field"),
            "hostile.jsonl:6": ("clean", "unknown_role"), "hostile.jsonl:7": ("clean", "too_large"),
            "hostile_dump.json[#1]": ("read", "too_deep"), "hostile_dump.json[#2]": ("read", "too_large"),
            "hostile_dump.json[#3]": ("read", "invalid_json"), "scripts.html": ("read", "no_next_data"),
            "big.html": ("read", "too_large")}


@pytest.mark.timeout(240)
def test_hostile_set_is_counted_and_the_run_goes_on(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    expected = _write_hostile(d)
    report = run_clean([d], tmp_path / "out" / "clean.jsonl", workers=2, progress=False)
    log = [json.loads(x) for x in (tmp_path / "out" / "clean.dropped.jsonl").read_text().splitlines()]
    got = {d_["where"].split("/in/")[-1]: (d_["step"], d_["reason"]) for d_ in log}
    assert got == expected
    kept = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "clean.jsonl").read_text().splitlines())}
    assert list(kept) == ["ok1", "ok2", "d_ok1", "d_ok2", "button", "pre", "svg"]
    # an unclosed <pre> holds the rest of the message as code; an unclosed <svg> / <button> is dropped
    assert [kept[k]["items"][1]["content"] for k in ("button", "pre", "svg")] == ["b", "a\n\n```\n\n```", "a"]
    assert report["steps"]["read"]["dropped_total"] + report["steps"]["clean"]["dropped_total"] == len(expected)


def test_converter_parity_cases():
    """Where html-to-markdown and markdownify wrote different Markdown, the old text is kept."""
    # a list after a list is numbered "1." (html-to-markdown: "1)"); loose items stay one a line
    assert html_to_markdown("<ol><li><p>a</p></li><li><p>b</p></li></ol><ol><li>c</li></ol>") == "1. a\n2. b\n\n1. c"
    # text that reads as Markdown at a line start is not escaped
    assert html_to_markdown("<p># not a title</p><p>- x</p><p>2. y</p>") == "# not a title\n\n- x\n\n2. y"
    assert html_to_markdown('<p><a href="https://a.b/c_d">https://a.b/c_d</a></p>') == "<https://a.b/c_d>"
    assert html_to_markdown("<p>a <button>Copy</button>b<svg><path/></svg></p>") == "a b"


def test_output_never_overwrites_an_input(tmp_path):
    from ochat.cli import main

    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(_conv("a")) + "\n")
    before = src.read_bytes()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["data", "clean", str(src), "--out", str(src), "--no-progress"])
    assert code == 2 and "is also an input" in err.getvalue() and err.getvalue().count("\n") == 1
    assert src.read_bytes() == before


def test_run_that_keeps_nothing_fails_with_the_flag_to_pass(tmp_path, _mistral_tokenizer):
    from ochat.cli import main

    src = tmp_path / "unlabelled.json"
    src.write_text(json.dumps([_conv("a"), _conv("b", "<p>Other answer.</p>")]))  # no model label
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["data", "pipeline", str(src), "--out", str(tmp_path / "o"), "--model-type", "openchat_3.5",
                     "--tokenizer", "mistral-common", "--no-progress", "--workers", "1"])
    msg = err.getvalue()
    assert code == 2 and "kept 0 conversations" in msg and "2 no_model_label" in msg and "--models any" in msg
    assert not list((tmp_path / "o").glob("openchat_3.5.*"))
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["data", "pipeline", str(src), "--out", str(tmp_path / "o"), "--model-type", "openchat_3.5",
                     "--tokenizer", "mistral-common", "--no-progress", "--workers", "1", "--models", "any"]) == 0


def test_limits_are_flags(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(_conv("a", "<p>" + "w" * 3000 + "</p>")) + "\n" + json.dumps(_conv("b")) + "\n")
    report = run_clean([src], tmp_path / "c.jsonl", workers=1, progress=False,
                       limits=Limits(max_record_bytes=2000, max_message_chars=1000))
    assert report["steps"]["read"]["dropped"] == {"too_large": 1} and report["steps"]["clean"]["out"] == 1
