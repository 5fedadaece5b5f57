"""`ochat eval report`: tables, PNG charts and a self-contained HTML page, checked in headless Chromium."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ochat.cli import main
from ochat.evaluation.files import new_answer
from test_eval_judge import ScriptedJudge, biased_scores, biased_verdict, rating

EVIL = ("Here is a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint('x < y')\n```\n\n"
        "<script>document.title = 'pwned'</script> <img src=x onerror=\"document.title='pwned'\"> "
        "[click](javascript:document.title='pwned') ![remote](http://example.invalid/track.png) QUALITY=5")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("mt_bench")
    rows = [json.loads(x) for x in (shared_data / "fastchat/mt_bench__question.jsonl").read_text().splitlines()]
    qs = [r for r in rows if r["category"] == "writing"][:2] + [r for r in rows if r["category"] == "math"][:1]
    (root / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    answers = root / "model_answer"
    answers.mkdir()
    for model, quality in (("ochat", 8), ("evil", 5), ("gpt-3.5-turbo", 6)):
        with open(answers / f"{model}.jsonl", "w") as f:
            for q in qs:
                turns = [EVIL if model == "evil" else f"**{model}** says hi to turn {i + 1}. QUALITY={quality}"
                         for i in range(2)]
                f.write(json.dumps(new_answer(q["question_id"], model, turns)) + "\n")
    judge = ScriptedJudge()
    try:
        common = ["--bench", str(root / "question.jsonl"), "--answers", str(answers), "--judge-model", "gpt-4",
                  "--judge-api-base", judge.base_url, "--backoff", "0.01", "--retries", "2"]
        judge.script = rating
        assert main(["eval", "judge", "--mode", "single", *common,
                     "--references", str(shared_data / "fastchat/mt_bench__reference_answer__gpt-4.jsonl")]) == 0
        judge.script = biased_verdict
        assert main(["eval", "judge", "--mode", "pairwise-baseline", "--baseline", "gpt-3.5-turbo", *common]) == 0
        # one unparseable vicuna review: reported as failed, not scored
        judge.script = lambda body, n: "no scores" if qs[0]["turns"][0] in body["messages"][-1]["content"] \
            and "evil" not in body["messages"][-1]["content"] and "ochat" in body["messages"][-1]["content"] \
            else biased_scores(body, n)
        assert main(["eval", "judge", "--mode", "vicuna", "--baseline", "gpt-3.5-turbo", *common]) == 1
    finally:
        judge.stop()
    return root


def test_report_files_and_tables(bench_dir, capsys):
    assert main(["eval", "report", str(bench_dir)]) == 0
    out = capsys.readouterr().out
    assert "gpt-4_single" in out and "gpt-4_pair" in out and "gpt-4_vicuna" in out
    rep = bench_dir / "report"
    md = (rep / "report.md").read_text()
    assert "| ochat | 8.00 |" in md  # single: mean rating of ochat
    assert "| ochat | 8.00 ± 0.00 (2) | 8.00 ± 0.00 (4) |" in md  # per category (math, writing) with SE and n
    assert "| ochat | 100.0 | 0.0 | 0 | 100.0 |" in md  # pairwise vs the baseline: won every game
    vicuna_rows = [ln for ln in md.split("gpt-4_vicuna")[1].splitlines() if ln.startswith("| ochat")]
    assert vicuna_rows and vicuna_rows[0].endswith("| 2 | 1 |")  # 2 scored, 1 failed
    for name in ("gpt-4_single", "gpt-4_pair", "gpt-4_vicuna"):
        for kind in ("scores", "categories"):
            png = rep / f"{name}.{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_html_report_in_chromium(bench_dir, browser, tmp_path):
    assert main(["eval", "report", str(bench_dir), "--out", str(tmp_path / "rep")]) == 0
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "rep" / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert page.title() == "ochat evaluation report"  # no injected script ran
    assert page.locator("script").count() == 0
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []  # self-contained
    imgs = page.locator("img[src^='data:image/png']")
    assert imgs.count() == 6
    assert all(w > 100 for w in imgs.evaluate_all("els => els.map(e => e.naturalWidth)"))
    # the malicious answer shows as text; its Markdown table and code are rendered
    qa = page.locator("table.qa")
    assert "<script>document.title" in qa.inner_text()
    assert qa.locator("td table").count() >= 1 and qa.locator("td pre code").count() >= 1
    assert qa.locator("a[href^='javascript']").count() == 0
    assert qa.locator("img[onerror]").count() == 0
    # judge explanations and verdicts per model
    assert qa.locator("details").count() > 0
    assert "turn 2 vs gpt-3.5-turbo: win" in qa.inner_text()
    assert "not scored" in qa.inner_text()
    page.screenshot(path=str(tmp_path / "rep" / "screenshot.png"), full_page=False)
    if os.environ.get("OCHAT_KEEP_SCREENSHOT"):
        Path(os.environ["OCHAT_KEEP_SCREENSHOT"]).write_bytes((tmp_path / "rep" / "screenshot.png").read_bytes())
    assert errors == []
    page.close()
