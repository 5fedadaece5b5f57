"""`ochat viz embed`: the local all-MiniLM-L6-v2 model (offline) and an OpenAI-compatible endpoint."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from ochat.cli import main
from ochat.errors import OchatError
from ochat.visualization.embed import embed_texts, load_embeddings, local_model_dir
from ochat.visualization.texts import read_records

CAT = "How do I stop my cat from scratching the sofa?"
CAT2 = "My kitten keeps clawing the couch. How can I make her stop?"
SQL = "Write a SQL query that joins orders with customers and sums the totals per country."


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_local_model_ships_in_the_package():
    assert (local_model_dir() / "model.safetensors").is_file()


def test_local_embeddings_put_similar_texts_closer(tmp_path):
    emb = embed_texts([CAT, CAT2, SQL, ""], "local", progress=False)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert _cos(emb[0], emb[1]) > _cos(emb[0], emb[2]) + 0.3
    assert _cos(emb[0], emb[1]) > _cos(emb[1], emb[2]) + 0.3


def test_long_texts_are_truncated_to_the_token_budget():
    long = CAT + " " + " ".join(["The quarterly revenue of the company grew by twelve percent."] * 400)
    a, b = embed_texts([long, CAT + " " + " ".join(["Totally different words here about astronomy."] * 400)],
                       "local", max_tokens=12, progress=False)
    # Only the first 12 tokens count ([CLS] and 11 of the question), and those are the same.
    assert _cos(a, b) > 0.99
    with pytest.raises(OchatError, match="--max-tokens"):
        embed_texts([CAT], "local", max_tokens=100_000, progress=False)


def test_cli_embeds_pipeline_text_jsonl(tmp_path, capsys):
    lines = [{"id": "a", "text": f"<s>GPT4 Correct User: {CAT}<|end_of_turn|>GPT4 Correct Assistant: Try a scratching post.<|end_of_turn|>",
              "conversation": {"items": [{"role": "user", "content": CAT, "weight": 0.0},
                                         {"role": "assistant", "content": "Try a scratching post.", "weight": 1.0}],
                               "condition": "GPT4 Correct", "system": ""}},
             {"conversations": [{"from": "human", "value": CAT2}, {"from": "gpt", "value": "Use double-sided tape."}]},
             {"items": [{"role": "user", "content": SQL}, {"role": "assistant", "content": "SELECT ..."}]}]
    src = tmp_path / "x.train.text.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "emb.npy"
    assert main(["viz", "embed", "--in", str(src), "--out", str(out), "--batch-size", "2"]) == 0
    assert "3 embeddings" in capsys.readouterr().out
    emb = load_embeddings(out)
    assert emb.shape == (3, 384)
    assert _cos(emb[0], emb[1]) > _cos(emb[0], emb[2])
    # What is embedded is the clean conversation, not the template tokens.
    assert read_records(src)[0].embedding_text.startswith(f"User: {CAT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def embedding_server():
    """A real OpenAI-compatible /v1/embeddings server (the local model behind FastAPI) that answers
    503 to its first request, so the client's retries are exercised."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from ochat.visualization.embed import load_local_model

    model = load_local_model()
    app = FastAPI()
    seen = {"requests": 0, "batches": []}

    @app.post("/v1/embeddings")
    def embeddings(body: dict):
        seen["requests"] += 1
        if seen["requests"] == 1:
            return JSONResponse({"error": {"message": "warming up", "type": "server_error"}}, status_code=503)
        if body.get("model") != "minilm":
            return JSONResponse({"error": {"message": "model not found", "type": "invalid_request_error"}}, status_code=404)
        seen["batches"].append(len(body["input"]))
        vecs = model.encode(body["input"])
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        return {"object": "list", "model": "minilm", "data": data[::-1],   # any order: the client sorts by index
                "usage": {"prompt_tokens": 1, "total_tokens": 1}}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen, model
    server.should_exit = True
    thread.join(5)


def test_openai_embedder_batches_and_retries(embedding_server):
    base, seen, model = embedding_server
    texts = [CAT, CAT2, SQL, "hello", "world"]
    emb = embed_texts(texts, "openai", batch_size=2, model="minilm", api_base=base, api_key="k", progress=False)
    assert seen["requests"] == 4 and seen["batches"] == [2, 2, 1]     # one 503, then three batches
    assert np.allclose(emb, model.encode(texts, normalize_embeddings=True), atol=1e-5)
    with pytest.raises(OchatError, match="404.*'nope'"):
        embed_texts(texts, "openai", model="nope", api_base=base, api_key="k", progress=False)


def test_openai_embedder_unreachable_is_a_one_line_error(capsys, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"items": [{"role": "user", "content": "hi"}]}) + "\n")
    code = main(["viz", "embed", "--in", str(src), "--out", str(tmp_path / "e.npy"), "--embedder", "openai",
                 "--api-base", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m", "--retries", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]      # (after the progress bar)
    assert code == 2 and err.startswith("error: cannot reach the embedding endpoint")
    assert not (tmp_path / "e.npy").exists()
