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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


class TokenizedWriter:
    """Write one split row group by row group (memory stays flat), atomically: the file appears at
    `path` only on `close()`; `abort()` (or an exception inside `with`) leaves nothing behind.

    Same columns and metadata as `write_tokenized`; `extra_metadata` adds `ochat.*` keys."""

    def __init__(self, path: str | os.PathLike, model_type: str, tokenizer_fingerprint: str,
                 extra_metadata: dict[str, str] | None = None, rows_per_group: int = 2048):
        self.path = Path(path)
        meta = {META_MODEL_TYPE: model_type.encode(), META_TOKENIZER: tokenizer_fingerprint.encode(),
                META_VERSION: ochat.__version__.encode()}
        meta.update({f"ochat.{k}".encode(): str(v).encode() for k, v in (extra_metadata or {}).items()})
        self.schema = SCHEMA.with_metadata(meta)
        self.rows_per_group = rows_per_group
        self.rows = 0
        self._buf: dict[str, list] = {"id": [], "condition": [], "tokens": [], "weights": []}
        self._tables: list[pa.Table] = []  # from write_batch, written as one row group
        self._table_rows = 0
        self._ctx = atomic_path(self.path, suffix=".parquet")
        self._tmp = self._ctx.__enter__()
        # token ids and weights gain nothing from a dictionary; writing one costs most of the time
        self._writer = pq.ParquetWriter(self._tmp, self.schema, use_dictionary=["id", "condition"])

    def write(self, id: str, condition: str, tokens: Sequence[int], weights: Sequence[float]) -> None:
        self._flush_tables()  # rows written by write_batch come first
        for k, v in (("id", id), ("condition", condition), ("tokens", tokens), ("weights", weights)):
            self._buf[k].append(v)
        self.rows += 1
        if len(self._buf["id"]) >= self.rows_per_group:
            self._flush()

    def write_batch(self, ids: pa.Array, conditions: pa.Array, tokens: pa.Array, weights: pa.Array) -> None:
        """Many rows at once, as Arrow arrays (tokens list<int32>, weights list<float32>)."""
        self._flush_rows()  # keep the order when both ways are used
        self._tables.append(pa.table({"id": ids, "condition": conditions, "tokens": tokens, "weights": weights,
                                      "length": pc.list_value_length(tokens).cast(pa.int32())}, schema=self.schema))
        self._table_rows += len(ids)
        self.rows += len(ids)
        if self._table_rows >= self.rows_per_group:
            self._flush_tables()

    def _flush_tables(self) -> None:
        if self._tables:
            self._writer.write_table(pa.concat_tables(self._tables), row_group_size=max(self._table_rows, 1))
            self._tables, self._table_rows = [], 0

    def _flush(self) -> None:
        self._flush_tables()
        self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._buf["id"]:
            return
        b = self._buf
        lengths = np.fromiter((len(t) for t in b["tokens"]), dtype=np.int32, count=len(b["tokens"]))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
        # one concatenation instead of a Python object per token (rows may be lists or numpy arrays)
        tokens = np.concatenate([np.asarray(t, dtype=np.int32) for t in b["tokens"]]) if b["tokens"] else []
        weights = np.concatenate([np.asarray(w, dtype=np.float32) for w in b["weights"]]) if b["weights"] else []
        self._writer.write_table(pa.table({
            "id": pa.array(b["id"], pa.string()), "condition": pa.array(b["condition"], pa.string()),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens, pa.int32())),
            "weights": pa.ListArray.from_arrays(offsets, pa.array(weights, pa.float32())),
            "length": pa.array(lengths, pa.int32()),
        }, schema=self.schema))
        self._buf = {k: [] for k in b}

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "TokenizedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
