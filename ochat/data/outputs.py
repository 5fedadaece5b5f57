"""Where a data run writes: a hidden work folder moved into place on success (`Work`), canonical
JSONL (`LineSink`), and tokenized rows routed into their split's Parquet + text JSONL (`RowSink`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ochat.data.steps import ROW_SCHEMA
from ochat.data.tokenized import TokenizedWriter
from ochat.utils.atomic import fsync_path


class Work:
    """A hidden work folder next to the outputs; its files are moved into place only on success."""

    def __init__(self, out_dir: Path, prefix: str):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{prefix}.pipeline-*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{prefix}.pipeline-", suffix=".tmp", dir=out_dir))

    def commit(self, names: dict[str, str]) -> None:
        """Move the work files `names` (work name -> output name) into place, durably (as `atomic_path`)."""
        umask = os.umask(0)
        os.umask(umask)
        for src, dst in names.items():
            p = self.path / src
            os.chmod(p, 0o666 & ~umask)  # temp files are private; results are ordinary files
            fsync_path(p)
            os.replace(p, self.out_dir / dst)
        fsync_path(self.out_dir)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _text_file(path: Path):
    # a file name that is not UTF-8 (surrogate-escaped, in "source") must not stop the run
    return open(path, "w", encoding="utf-8", errors="backslashreplace")


class LineSink:
    """Canonical JSONL: one file, or (with `route`) a work file of (group, line) routed at the end."""

    def __init__(self, work: Path, names: dict[str, str]):
        self.work, self.names = work, names
        self.routed = "eval" in names
        self.f = _text_file(work / ("all.work" if self.routed else "out.jsonl"))
        self.counts = {"train": 0, "eval": 0}

    def lines(self, lines: list[str], group: str, where: str) -> None:
        for line in lines:
            self.f.write((json.dumps(group, ensure_ascii=False) + "\t" if self.routed else "") + line + "\n")

    def finish(self, is_eval) -> dict[str, Any]:
        self.f.close()
        if not self.routed:
            return {"output": str(self.names["out"])}
        files = {s: _text_file(self.work / f"{s}.jsonl") for s in ("train", "eval")}
        with open(self.work / "all.work", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                group, _, rec = line.partition("\t")
                split = "eval" if is_eval(json.loads(group)) else "train"
                files[split].write(rec)
                self.counts[split] += 1
        for x in files.values():
            x.close()
        (self.work / "all.work").unlink()
        return {"outputs": {s: str(self.names[s]) for s in files}}


class RowSink:
    """Tokenized rows: a work file (Arrow IPC) routed at the end into PREFIX.{train,eval}.parquet,
    .text.jsonl (and the v1 .json / .text.json)."""

    def __init__(self, work: Path, prefix: str, model_type: str, fingerprint: str, legacy_json: bool,
                 meta: dict[str, str]):
        self.work, self.prefix, self.legacy = work, prefix, legacy_json
        self.model_type, self.fingerprint, self.meta = model_type, fingerprint, meta
        self.path = work / "rows.arrow.work"
        self.writer = pa.ipc.new_stream(str(self.path), ROW_SCHEMA)  # uncompressed: read back at once

    def rows(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def finish(self, is_eval_set: set[str], out_dir: Path) -> dict[str, Any]:
        self.writer.close()
        splits = {s: _SplitFiles(self.work, self.prefix, s, self) for s in ("train", "eval")}
        eval_groups = pa.array(sorted(is_eval_set), pa.string())
        try:
            # read, not memory-mapped: a mapped 2 GB work file would count as resident memory
            with pa.OSFile(str(self.path)) as f, pa.ipc.open_stream(f) as reader:
                for batch in reader:
                    mask = pc.is_in(batch.column("group"), value_set=eval_groups)
                    splits["eval"].write(batch.filter(mask))
                    splits["train"].write(batch.filter(pc.invert(mask)))
            for s in splits.values():
                s.close()
        except BaseException:
            for s in splits.values():
                s.abort()
            raise
        self.path.unlink()
        return {name: s.summary(out_dir) for name, s in splits.items()}


class _SplitFiles:
    def __init__(self, work: Path, prefix: str, split: str, sink: RowSink):
        self.files = {"parquet": work / f"{prefix}.{split}.parquet", "text": work / f"{prefix}.{split}.text.jsonl"}
        self.parquet = TokenizedWriter(self.files["parquet"], sink.model_type, sink.fingerprint, sink.meta)
        self.text = _text_file(self.files["text"])
        self.legacy = None
        if sink.legacy:
            self.files["legacy"] = work / f"{prefix}.{split}.json"
            self.files["legacy_text"] = work / f"{prefix}.{split}.text.json"
            self.legacy = [_text_file(self.files["legacy"]), _text_file(self.files["legacy_text"])]
        self.rows = self.tokens = self.trained_tokens = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        self.parquet.write_batch(batch.column("id"), batch.column("condition"), batch.column("tokens"),
                                 batch.column("weights"))
        texts = batch.column("text").to_pylist()
        self.text.write("\n".join(texts) + "\n")
        if self.legacy:  # the v1 layout: [[tokens, mask], ...] and ["text", ...], streamed
            for tokens, weights, text in zip(batch.column("tokens").to_pylist(), batch.column("weights").to_pylist(),
                                             texts):
                sep = ",\n" if self.rows else "[\n"
                self.legacy[0].write(sep + json.dumps([tokens, [w > 0 for w in weights]]))
                self.legacy[1].write(sep + json.dumps(json.loads(text)["text"], ensure_ascii=False))
                self.rows += 1
        else:
            self.rows += batch.num_rows
        self.tokens += int(pc.sum(pc.list_value_length(batch.column("tokens"))).as_py() or 0)
        self.trained_tokens += int(pc.sum(pc.greater(pc.list_flatten(batch.column("weights")), 0)).as_py() or 0)

    def close(self) -> None:
        self.parquet.close()
        self.text.close()
        for f in self.legacy or []:
            f.write("\n]\n" if self.rows else "[]\n")
            f.close()

    def abort(self) -> None:
        self.parquet.abort()
        for f in [self.text, *(self.legacy or [])]:
            f.close()

    def summary(self, out_dir: Path) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
                **{k: str(out_dir / p.name) for k, p in self.files.items()}}
