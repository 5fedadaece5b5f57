"""Load `PREFIX.{train,eval}.parquet` for training: check it was made for this model, truncate overlong rows."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ochat.data.tokenized import read_tokenized
from ochat.errors import OchatError


@dataclass
class TokenizedSplit:
    path: Path
    tokens: list[np.ndarray]
    weights: list[np.ndarray]
    ids: list[str]
    truncated: int = 0        # conversations cut to batch_max_len
    no_supervision: int = 0   # conversations with no token of weight > 0 (kept; they cost compute only)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))

    def __len__(self) -> int:
        return len(self.tokens)


def split_path(prefix: str | os.PathLike, split: str) -> Path:
    return Path(f"{prefix}.{split}.parquet")


def _list_column(table: pa.Table, name: str, dtype) -> list[np.ndarray]:
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def load_split(prefix: str | os.PathLike, split: str, model_type: str, tokenizer_fingerprint: str,
               model_dir: str | os.PathLike, batch_max_len: int, strict: bool = False) -> TokenizedSplit:
    """Read one split, refusing data made for another model type or tokenizer than `model_dir`'s."""
    path = split_path(prefix, split)
    table, meta = read_tokenized(path)
    if meta["model_type"] != model_type or meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise OchatError(
            f"{path}: made for model type '{meta['model_type'] or '?'}' with tokenizer "
            f"{meta['tokenizer_fingerprint'] or '?'}, but --model {model_dir} is model type '{model_type}' with "
            f"tokenizer {tokenizer_fingerprint} (re-run `ochat data` with this model's --model-type and tokenizer)")
    tokens = _list_column(table, "tokens", np.int64)
    weights = _list_column(table, "weights", np.float32)
    ids = table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(tokens))]
    split_data = TokenizedSplit(path, tokens, weights, ids)
    for i, (t, w) in enumerate(zip(tokens, weights)):
        if len(t) != len(w):
            raise OchatError(f"{path}: row {i} (id {ids[i]!r}): {len(t)} tokens but {len(w)} weights")
        if len(t) > batch_max_len:
            if strict:
                raise OchatError(f"{path}: conversation id {ids[i]!r} has {len(t)} tokens > --batch-max-len "
                                 f"{batch_max_len} (drop --strict to truncate it, or raise --batch-max-len)")
            tokens[i], weights[i] = t[:batch_max_len], w[:batch_max_len]
            split_data.truncated += 1
        if not (weights[i][1:] > 0).any():
            split_data.no_supervision += 1
    return split_data


def fingerprint(split: TokenizedSplit) -> str:
    """sha256 of the split's tokens and weights (after truncation): the identity of the data a run saw."""
    h = hashlib.sha256()
    for t, w in zip(split.tokens, split.weights):
        h.update(np.int64(len(t)).tobytes())
        h.update(np.ascontiguousarray(t, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return "sha256:" + h.hexdigest()[:16]
