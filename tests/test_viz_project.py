"""`ochat viz project` / `html` / `map`: UMAP + K-Means into the visualizer JSON, the page, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import plotly.offline
import pytest

from ochat.cli import main
from ochat.visualization.html import read_visualizer_json, render_html, role_markers
from ochat.visualization.project import cluster, project_3d
from ochat.visualization.texts import read_records


def _blobs(n_per: int, k: int = 3, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    truth = np.repeat(np.arange(k), n_per)
    return (centres[truth] + rng.normal(size=(k * n_per, dim))).astype(np.float32), truth


def _jsonl(path, n, make=lambda i: {"items": [{"role": "user", "content": f"question {i}"},
                                                {"role": "assistant", "content": f"answer {i}"}]}):
    path.write_text("".join(json.dumps(make(i)) + "\n" for i in range(n)))
    return path


def test_umap_keeps_groups_apart_and_kmeans_finds_them():
    emb, truth = _blobs(40)
    coords = project_3d(emb, n_neighbors=15, seed=0, progress=False)
    assert coords.shape == (120, 3) and np.abs(coords).max() <= 1.0 + 1e-6
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    same = truth[:, None] == truth[None]
    assert d[same].mean() * 3 < d[~same].mean()
    labels = cluster(emb, 3, seed=0)
    # the same partition as the truth (up to renaming), numbered by size
    assert len({(t, l) for t, l in zip(truth, labels)}) == 3
    assert np.array_equal(project_3d(emb, 15, seed=0, progress=False), coords)   # the seed makes it reproducible


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_tiny_inputs_still_make_a_map(tmp_path, capsys, n):
    emb, _ = _blobs(n, k=1)
    src = _jsonl(tmp_path / "c.jsonl", n)
    np.save(tmp_path / "e.npy", emb)
    out = tmp_path / "tiny.visualizer.json"
    assert main(["viz", "project", "--emb", str(tmp_path / "e.npy"), "--texts", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    data = json.loads(out.read_text())
    assert len(data["text"]) == len(data["embedding"]) == len(data["color"]) == n
    assert all(len(p) == 3 for p in data["embedding"])
    assert sum(data["cluster_sizes"]) == n and max(data["color"]) < n
    assert data["text"][0] == "User: question 0\n\nAssistant: answer 0"
    assert data["conversation"][0]["items"][1] == {"role": "assistant", "content": "answer 0", "weight": None}
    if n >= 4:
        assert f"using {n - 1}" in err          # n_neighbors 500 clipped, with a note


def test_project_keeps_ids_and_pipeline_text(tmp_path):
    emb, _ = _blobs(10, k=2)
    src = _jsonl(tmp_path / "p.train.text.jsonl", 20, lambda i: {
        "id": f"conv-{i}", "text": f"<s>GPT4 Correct User: q{i}<|end_of_turn|>GPT4 Correct Assistant: a{i}<|end_of_turn|>",
        "conversation": {"items": [{"role": "user", "content": f"q{i}", "weight": 0.0},
                                   {"role": "assistant", "content": f"a{i}", "weight": 1.0}], "condition": "GPT4 Correct"}})
    np.save(tmp_path / "e.npy", emb)
    out = tmp_path / "p.visualizer.json"
    assert main(["viz", "project", "--emb", str(tmp_path / "e.npy"), "--texts", str(src), "--out", str(out),
                 "--n-neighbors", "5", "--n-clusters", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["id"][3] == "conv-3" and data["text"][3].startswith("<s>GPT4 Correct User: q3")
    assert data["conversation"][3]["condition"] == "GPT4 Correct"
    assert sorted(data["cluster_sizes"]) == [10, 10]


def test_openchat_example_converts_to_html(shared_data, tmp_path):
    src = shared_data / "openchat_v1" / "example.visualizer.json"
    out = tmp_path / "example.html"
    assert main(["viz", "html", "--in", str(src), "--out", str(out)]) == 0
    page = out.read_text()
    plotly_js = plotly.offline.get_plotlyjs()
    assert plotly_js in page                                   # inlined: the page works offline
    ours = page.replace(plotly_js, "")
    assert "Who are you?" in ours and "<script src" not in ours and "http" not in ours


def test_page_escapes_conversation_text():
    data = {"text": ["</script><script>alert(1)</script> <!-- x"], "embedding": [[0, 0, 0]], "color": [0]}
    page = render_html(data, "t</title><b>")
    body = page.split('<script id="ochat-data" type="application/json">')[1].split("</script>")[0]
    assert json.loads(body)["text"] == data["text"]                 # the JSON is intact ...
    assert "<" not in body                                          # ... and cannot close its <script>
    assert "<title>t&lt;/title&gt;&lt;b&gt;</title>" in page


def test_role_markers_cover_the_templates():
    roles = dict(role_markers()["roles"])
    assert roles["Human:"] == "user" and roles["GPT4 Correct Assistant:"] == "assistant" and roles["USER:"] == "user"
    assert "<|end_of_turn|>" in role_markers()["special"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["viz", "embed", "--in", str(empty), "--out", str(tmp_path / "e.npy")]) == 2
    assert "no conversations" in _err(capsys)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"items": [{"role": "user", "content": "hi"}]}) + "\n{not json\n")
    assert main(["viz", "embed", "--in", str(broken), "--out", str(tmp_path / "e.npy")]) == 2
    assert "broken.jsonl line 2: not valid JSON" in _err(capsys)

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert main(["viz", "embed", "--in", str(odd), "--out", str(tmp_path / "e.npy")]) == 2
    assert "odd.jsonl line 1: expected a field 'text'" in _err(capsys)

    bad_role = tmp_path / "role.jsonl"
    bad_role.write_text(json.dumps({"items": [{"role": "robot", "content": "hi"}]}) + "\n")
    assert main(["viz", "embed", "--in", str(bad_role), "--out", str(tmp_path / "e.npy")]) == 2
    assert "role.jsonl line 1" in _err(capsys)

    # mismatched lengths: 5 embeddings for 6 conversations
    texts = _jsonl(tmp_path / "six.jsonl", 6)
    np.save(tmp_path / "five.npy", _blobs(5, k=1)[0])
    out = tmp_path / "x.visualizer.json"
    assert main(["viz", "project", "--emb", str(tmp_path / "five.npy"), "--texts", str(texts), "--out", str(out)]) == 2
    assert "5 embeddings for 6 conversations" in _err(capsys)
    assert not out.exists()

    (tmp_path / "notnpy.npy").write_text("hello")
    assert main(["viz", "project", "--emb", str(tmp_path / "notnpy.npy"), "--texts", str(texts), "--out", str(out)]) == 2
    assert "not a NumPy .npy file" in _err(capsys)

    # texts without embeddings, mismatched lengths, bad points in a visualizer JSON
    for data, msg in [({"text": ["a", "b"]}, "field 'embedding' is missing"),
                      ({"text": ["a", "b"], "embedding": [[0, 0, 0]], "color": [0, 1]}, "'embedding' has 1 entries but 'text' has 2"),
                      ({"text": ["a"], "embedding": [[0, 0]], "color": [0]}, "embedding[0]: expected [x, y, z]"),
                      ({"text": [], "embedding": [], "color": []}, "nothing to show")]:
        bad = tmp_path / "bad.visualizer.json"
        bad.write_text(json.dumps(data))
        assert main(["viz", "html", "--in", str(bad), "--out", str(tmp_path / "bad.html")]) == 2
        assert msg in _err(capsys)
    assert not (tmp_path / "bad.html").exists()


def test_cli_exit_code_in_a_real_process(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = subprocess.run([sys.executable, "-m", "ochat", "viz", "map", "--in", str(tmp_path / "empty.jsonl"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_map_writes_json_and_page(shared_data, tmp_path, capsys):
    # FastChat's ShareGPT-format sample (a JSON list), first 60 conversations
    convs = json.loads((shared_data / "fastchat" / "dummy_conversation.json").read_text())[:60]
    src = tmp_path / "sample.json"
    src.write_text(json.dumps(convs))
    assert main(["viz", "map", "--in", str(src), "--out", str(tmp_path / "viz"), "--n-clusters", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    data = read_visualizer_json(tmp_path / "viz" / "sample.visualizer.json")
    assert len(data["text"]) == 60 and len(data["cluster_sizes"]) == 4
    assert data["id"][0] == convs[0]["id"]
    assert len(read_records(src)) == 60
    assert (tmp_path / "viz" / "sample.html").stat().st_size > 3_000_000
