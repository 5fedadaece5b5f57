"""`ochat data synth --kind ...`: each kind of synthetic data, written through the CLI and read back."""

from __future__ import annotations

import json

from ochat.cli import main


def test_synth_kinds_write_what_they_say(tmp_path, capsys):
    assert main(["data", "synth", "--kind", "pages", "--n", "5", "--out", str(tmp_path / "pages")]) == 0
    assert len(list((tmp_path / "pages").glob("*.html"))) == 5
    assert main(["data", "synth", "--kind", "quickstart", "--n", "40", "--out", str(tmp_path / "qs")]) == 0
    summary = json.loads((tmp_path / "qs" / "corpus.json").read_text())
    assert summary["conversations"] == 40 and (tmp_path / "qs" / "test.jsonl").stat().st_size > 0
    assert main(["data", "synth", "--kind", "texts", "--n", "7", "--out", str(tmp_path / "t.text.jsonl")]) == 0
    lines = (tmp_path / "t.text.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["conversation"]["items"] for line in lines)
    # the old spelling still works; an unknown kind is a one-line error
    assert main(["data", "synth", "--pages", "2", "--out", str(tmp_path / "old")]) == 0
    assert len(list((tmp_path / "old").glob("*.html"))) == 2
    capsys.readouterr()
    assert main(["data", "synth", "--kind", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "--kind" in capsys.readouterr().err
