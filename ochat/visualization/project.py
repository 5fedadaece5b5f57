"""Project embeddings to 3D with UMAP and colour them with K-Means, into the visualizer JSON of
OpenChat: `{"text": [...], "embedding": [[x, y, z], ...], "color": [...]}` plus optional keys that
the page uses when present ("id", "conversation", "cluster_names", "cluster_sizes")."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ochat.errors import OchatError
from ochat.utils.atomic import atomic_write_text
from ochat.visualization.texts import Record, conversation_json

# Up to this many points an exact k-NN (one matrix product in chunks) beats UMAP's NN-descent:
# at 10k points and k=500 it takes seconds instead of a minute and a half, and is deterministic.
EXACT_KNN_MAX_POINTS = 50_000


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _exact_knn(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(emb)
    dists, idx = nn.kneighbors(emb)          # each point is its own first neighbour, as UMAP expects
    return idx.astype(np.int32), np.maximum(dists, 0).astype(np.float32)


def project_3d(emb: np.ndarray, n_neighbors: int = 500, min_dist: float = 0.1, seed: int | None = 0,
               progress: bool = True) -> np.ndarray:
    """UMAP (cosine) to 3 dimensions, coordinates centred and scaled to [-1, 1]."""
    n = emb.shape[0]
    if n_neighbors < 2:
        raise OchatError(f"--n-neighbors: expected at least 2, got {n_neighbors}")
    if not 0 <= min_dist <= 1:
        raise OchatError(f"--min-dist: expected a value in [0, 1], got {min_dist}")
    if n < 4:
        # UMAP needs a neighbourhood graph; with so few points any layout is as good: spread them on a line.
        note(f"only {n} conversation(s): placing them on a line instead of running UMAP")
        return np.array([[i - (n - 1) / 2, 0.0, 0.0] for i in range(n)], dtype=np.float32) * (2 / max(n - 1, 1))
    if n_neighbors > n - 1:
        note(f"--n-neighbors {n_neighbors} is more than the {n} points allow; using {n - 1}")
        n_neighbors = n - 1
    with warnings.catch_warnings():
        # umap warns that a seed disables parallelism and that precomputed k-NN cannot `transform`.
        warnings.filterwarnings("ignore", module=r"umap(\.|$)")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*(n_jobs|knn_search_index|spectral).*")
        import umap

        knn = _exact_knn(emb, n_neighbors) if 4096 <= n <= EXACT_KNN_MAX_POINTS else (None, None, None)
        reducer = umap.UMAP(n_components=3, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine",
                            random_state=seed, precomputed_knn=knn,
                            # spectral init needs a few more points than dimensions
                            init="spectral" if n > 10 else "random",
                            tqdm_kwds={"disable": not progress, "desc": "UMAP epochs", "file": sys.stderr})
        coords = reducer.fit_transform(emb).astype(np.float64)
    coords -= coords.mean(axis=0)
    return (coords / max(np.abs(coords).max(), 1e-9)).astype(np.float32)


def cluster(emb: np.ndarray, n_clusters: int = 20, seed: int | None = 0) -> np.ndarray:
    """K-Means on the full embeddings (topics), labels renumbered by cluster size, largest first."""
    from sklearn.cluster import KMeans

    if n_clusters < 1:
        raise OchatError(f"--n-clusters: expected at least 1, got {n_clusters}")
    distinct = len(np.unique(emb, axis=0))
    if n_clusters > distinct:
        note(f"--n-clusters {n_clusters} is more than the {distinct} distinct conversations; using {distinct}")
        n_clusters = distinct
    labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit_predict(emb)
    sizes = np.bincount(labels, minlength=n_clusters)
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(n_clusters)
    return rank[labels]


def cluster_names(texts: list[str], labels: np.ndarray, top: int = 3) -> list[str]:
    """A few words that set each cluster apart (highest mean TF-IDF within the cluster)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = int(labels.max()) + 1
    try:
        vec = TfidfVectorizer(max_features=20_000, stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]{2,}\b",
                              max_df=0.5 if len(texts) >= 20 else 1.0, sublinear_tf=True)
        tfidf = vec.fit_transform(texts)
    except ValueError:                       # no words at all (e.g. only numbers)
        return [""] * k
    words = np.array(vec.get_feature_names_out())
    names = []
    for c in range(k):
        mean = np.asarray(tfidf[labels == c].mean(axis=0)).ravel()
        best = [i for i in np.argsort(-mean)[:top] if mean[i] > 0]
        names.append(", ".join(words[best]))
    return names


def visualizer_json(records: list[Record], coords: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    k = int(labels.max()) + 1
    out: dict[str, Any] = {
        "text": [r.text for r in records],
        "embedding": [[round(float(v), 5) for v in row] for row in coords],
        "color": [int(c) for c in labels],
        "id": [r.id for r in records],
        "cluster_names": cluster_names([r.embedding_text for r in records], labels),
        "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
    }
    if any(r.conversation is not None for r in records):
        out["conversation"] = [conversation_json(r.conversation) if r.conversation is not None else None
                               for r in records]
    return out


def project(records: list[Record], emb: np.ndarray, n_neighbors: int = 500, min_dist: float = 0.1,
            n_clusters: int = 20, seed: int | None = 0, progress: bool = True, where: str = "embeddings") -> dict[str, Any]:
    if emb.shape[0] != len(records):
        raise OchatError(f"{where}: {emb.shape[0]} embeddings for {len(records)} conversations; "
                         "embed the same file you project (`ochat viz embed --in FILE`)")
    coords = project_3d(emb, n_neighbors, min_dist, seed, progress)
    labels = cluster(emb, n_clusters, seed)
    return visualizer_json(records, coords, labels)


def write_visualizer_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, separators=(",", ":")))
