"""Reading and writing Hugging Face weight files tensor by tensor (never the whole model at once).

Reads `*.safetensors` (via `safetensors.safe_open`, memory-mapped) and `pytorch_model*.bin`
(via `torch.load(mmap=True)`); writes safetensors shards with a `model.safetensors.index.json`, the
layout `save_pretrained(max_shard_size=...)` produces.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ochat.errors import OchatError
from ochat.models.paths import weight_files


class Checkpoint(contextlib.AbstractContextManager):
    """Lazy, name-addressed access to the tensors of a model dir (files are memory-mapped, not read).

    keep_open=False maps a file only while one tensor is taken from it: the pages a tensor touched
    leave memory when the tensor is dropped, instead of staying resident until the whole file closes."""

    def __init__(self, model_dir: str | os.PathLike, keep_open: bool = True):
        self.dir = Path(model_dir)
        self.files = weight_files(self.dir)
        self.keep_open = keep_open
        self._handles: dict[Path, object] = {}
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            handle = self._open(f)
            for name in handle.keys():
                self.where[name] = f
                self.shapes[name] = (tuple(handle.get_slice(name).get_shape()) if hasattr(handle, "get_slice")
                                     else tuple(handle[name].shape))
            if not keep_open:
                self._close(f)

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                if f.suffix == ".safetensors":
                    self._handles[f] = safe_open(str(f), framework="pt", device="cpu").__enter__()
                else:  # memory-mapped: pages are read when a tensor is used
                    self._handles[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise OchatError(f"{f}: cannot read weights: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return self._handles[f]

    def _close(self, f: Path) -> None:
        handle = self._handles.pop(f)
        if hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)

    def names(self, file: Path | None = None) -> list[str]:
        return [n for n, f in self.where.items() if file is None or f == file]

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        handle = self._open(f)
        tensor = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        if not self.keep_open:
            self._close(f)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def close(self) -> None:
        for f in list(self._handles):
            self._close(f)

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_bytes`, then the index.

    Holds at most one shard in memory. One shard -> `model.safetensors` (no index), like save_pretrained."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        n = len(self.shards)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            os.replace(self.shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


def parse_size(size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    if isinstance(size, int) or str(size).isdigit():
        return int(size)
    try:
        return int(convert_file_size_to_int(size))
    except ValueError:
        raise OchatError(f"--max-shard-size {size}: expected a size like 5GB or 200MB") from None
