"""The pre-tokenized training set on disk: `PREFIX.train.parquet` / `PREFIX.eval.parquet`.

One row per conversation: `tokens` (list<int32>), `weights` (list<float32>, per-token loss weight),
`length` (int32), `condition` (string), `id` (string). The Arrow schema metadata records the model
type, the tokenizer fingerprint and the ochat version, so training can refuse data made for another
model type or tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

import ochat
from ochat.errors import OchatError
from ochat.utils.atomic import atomic_path

META_MODEL_TYPE = b"ochat.model_type"
META_TOKENIZER = b"ochat.tokenizer_fingerprint"
META_VERSION = b"ochat.version"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("condition", pa.string()),
    ("tokens", pa.list_(pa.int32())),
    ("weights", pa.list_(pa.float32())),
    ("length", pa.int32()),
])


def write_tokenized(path: str | os.PathLike, tokens: Sequence[Sequence[int]], weights: Sequence[Sequence[float]],
                    model_type: str, tokenizer_fingerprint: str, ids: Sequence[str] | None = None,
                    conditions: Sequence[str] | None = None) -> Path:
    """Write one split atomically."""
    n = len(tokens)
    ids = list(ids) if ids is not None else [str(i) for i in range(n)]
    conditions = list(conditions) if conditions is not None else [""] * n
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "condition": pa.array(conditions, pa.string()),
        "tokens": pa.array(tokens, pa.list_(pa.int32())),
        "weights": pa.array(weights, pa.list_(pa.float32())),
        "length": pa.array([len(t) for t in tokens], pa.int32()),
    }, schema=SCHEMA).replace_schema_metadata({
        META_MODEL_TYPE: model_type.encode(), META_TOKENIZER: tokenizer_fingerprint.encode(),
        META_VERSION: ochat.__version__.encode()})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.exists():
        raise OchatError(f"{path}: no such file (expected a pre-tokenized Parquet from `ochat data pipeline`)")
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise OchatError(f"{path}: not a Parquet file ({e})") from None
    return {"model_type": meta.get(META_MODEL_TYPE, b"").decode(),
            "tokenizer_fingerprint": meta.get(META_TOKENIZER, b"").decode(),
            "ochat_version": meta.get(META_VERSION, b"").decode()}


def read_tokenized(path: str | os.PathLike) -> tuple[pa.Table, dict[str, str]]:
    meta = read_metadata(path)
    table = pq.read_table(path)
    missing = [c for c in ("tokens", "weights", "length") if c not in table.column_names]
    if missing:
        raise OchatError(f"{path}: missing columns {missing} (expected {SCHEMA.names})")
    return table, meta
