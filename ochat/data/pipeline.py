"""The data pipeline: raw ShareGPT pages / dumps / ochat JSONL -> a pre-tokenized, C-RLFT-labelled set.

    read -> clean (+ exact dedup) -> filter / label -> split -> fit -> tokenize

Two streaming passes over the data, each spread over worker processes in order-preserving chunks
(memory stays flat: at most a few chunks are in flight):
1. read + clean in the workers; dedup, unique ids and the model filter in the parent, which writes
   the kept records to a work file and remembers only their group ids;
2. the split is drawn over those ids; fit + tokenize in the workers; the parent writes Parquet
   row groups and the text JSONL.
The split comes before fitting so that the pieces of one long conversation stay on one side.

Everything is written into a hidden work folder inside `out` and moved into place at the very end,
so a killed run leaves no partial output and a re-run starts clean.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

import ochat
from ochat.data.clean import CleanOptions, CleanResult, clean_record
from ochat.data.filter import filter_record, parse_condition_map, parse_models
from ochat.data.fit import Fitter, default_fit_mode
from ochat.data.sources import Bad, RawRecord, read_file, read_inputs
from ochat.data.split import choose_eval_groups
from ochat.data.tokenize import tokenize_records
from ochat.data.tokenized import TokenizedWriter
from ochat.errors import OchatError
from ochat.models.tokenizers import load_tokenizer, prepare_tokenizer, tokenizer_fingerprint
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import get_model_type

EXAMPLES_PER_REASON = 5


# -- reports ----------------------------------------------------------------------------------------

class Report:
    """Counts per step: conversations in and out, drops by reason (with examples), repairs.
    Every drop is also appended to a JSONL log (`where`, `id`, `step`, `reason`, `detail`)."""

    def __init__(self, drop_log: Path | None = None):
        self.steps: dict[str, dict[str, Any]] = {}
        self._log = open(drop_log, "w", encoding="utf-8") if drop_log else None
        self.info: dict[str, Any] = {}

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.setdefault(name, {"in": 0, "out": 0, "dropped": Counter(), "fixed": Counter(),
                                            "examples": {}, "seconds": 0.0})

    def drop(self, step: str, reason: str, where: str, id: str = "", detail: str = "") -> None:
        s = self.step(step)
        s["dropped"][reason] += 1
        ex = s["examples"].setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append({"where": where, "id": id, "detail": detail})
        if self._log:
            self._log.write(json.dumps({"step": step, "reason": reason, "where": where, "id": id,
                                        "detail": detail}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def to_dict(self) -> dict[str, Any]:
        steps = {name: {"in": s["in"], "out": s["out"], "dropped": dict(s["dropped"]),
                        "dropped_total": sum(s["dropped"].values()), "fixed": dict(s["fixed"]),
                        "examples": s["examples"], "seconds": round(s["seconds"], 3)}
                 for name, s in self.steps.items()}
        return {"ochat_version": ochat.__version__, **self.info, "steps": steps}

    def print_table(self, file=None) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="ochat data: conversations per step")
        for col in ("step", "in", "out", "dropped / fixed", "count", "example"):
            table.add_column(col, overflow="fold")
        for name, s in self.steps.items():
            table.add_row(name, str(s["in"]), str(s["out"]), "", "", "", style="bold")
            for reason, n in s["dropped"].most_common():
                ex = s["examples"].get(reason, [{}])[0]
                table.add_row("", "", "", reason, str(n), f"{ex.get('where', '')} {ex.get('detail', '')}".strip())
            for fix, n in s["fixed"].most_common():
                table.add_row("", "", "", f"(fixed) {fix}", str(n), "")
        Console(file=file or sys.stderr, width=140).print(table)


# -- order-preserving parallel map with bounded memory ----------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)


def parallel_map(fn: Callable[[list], Any], chunks: Iterable[list], workers: int, state: dict[str, Any]
                 ) -> Iterator[Any]:
    """`fn(chunk)` for each chunk, in order, over `workers` processes (in this one when workers <= 1).
    At most 2 * workers + 2 chunks are in flight, so a long input is never read ahead into memory."""
    if workers <= 1:
        _init_worker(state)
        for chunk in chunks:
            yield fn(chunk)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per worker
    with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for x in items:
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- worker functions -------------------------------------------------------------------------------

def _clean_chunk(items: list) -> list:
    options: CleanOptions = _STATE["clean"]
    out = []
    for it in items:
        for rec in (read_file(it) if isinstance(it, Path) else [it]):  # a page is read here, in the worker
            out.append((rec, clean_record(rec, options) if isinstance(rec, RawRecord) else None))
    return out


def _fit_tokenize_chunk(lines: list[str]) -> tuple[list, list, int]:
    """Work file lines -> per-record fit counts, and rows ready to write (numpy ids, a text JSONL line)."""
    fitter: Fitter = _STATE["fitter"]
    records = [json.loads(line) for line in lines]
    fits = [fitter.fit(r) for r in records]
    pieces = [p for f in fits for p in f.pieces]
    rows, cut = tokenize_records(fitter.encoder, pieces, fitter.max_context) if pieces else ([], 0)
    out_rows = [Row(r.id, r.group, r.condition, np.asarray(r.tokens, dtype=np.int32),
                    np.asarray(r.weights, dtype=np.float32),
                    json.dumps({"id": r.id, "text": r.text, "conversation": r.conversation, "model": r.model},
                               ensure_ascii=False))
                for r in rows]
    stats = [(rec["id"], _where(rec), len(f.pieces), f.dropped, f.truncated) for rec, f in zip(records, fits)]
    return stats, out_rows, cut


# -- steps ------------------------------------------------------------------------------------------

def _where(rec: dict) -> str:
    return rec.get("source") or rec.get("id", "")


def clean_stream(inputs: Sequence[str | os.PathLike], report: Report, blocked_words: Sequence[str],
                 dedup: bool = True, workers: int = 1, progress: bool = True, exclude: Path | None = None) -> Iterator[dict]:
    """Read and clean every input, dropping exact duplicates; yields records with unique ids."""
    read, clean = report.step("read"), report.step("clean")
    seen_hashes: set[bytes] = set()
    seen_ids: Counter = Counter()
    options = CleanOptions(blocked_words=tuple(blocked_words))
    t0 = time.perf_counter()
    bar = tqdm(desc="clean", unit="conv", disable=not progress, dynamic_ncols=True)
    try:
        for results in parallel_map(_clean_chunk, _chunks(read_inputs(inputs, exclude, defer_pages=True), 16), workers,
                                    {"clean": options}):
            for item, res in results:
                bar.update(1)
                read["in"] += 1
                if isinstance(item, Bad):
                    report.drop("read", item.reason, item.where, "", item.detail)
                    continue
                read["out"] += 1
                clean["in"] += 1
                res: CleanResult
                for fix in res.fixes:
                    clean["fixed"][fix] += 1
                if res.record is None:
                    report.drop("clean", res.reason, item.where, item.id, res.detail)
                    continue
                if dedup:
                    h = bytes.fromhex(res.hash)
                    if h in seen_hashes:
                        report.drop("clean", "duplicate", item.where, item.id, "same text as an earlier conversation")
                        continue
                    seen_hashes.add(h)
                rec = res.record
                seen_ids[rec["id"]] += 1
                if seen_ids[rec["id"]] > 1:  # distinct conversations sharing an id get distinct ids
                    new_id = f"{rec['id']}~{seen_ids[rec['id']]}"
                    if rec["group"] == rec["id"]:
                        rec["group"] = new_id
                    rec["id"] = new_id
                    clean["fixed"]["renamed_duplicate_id"] += 1
                clean["out"] += 1
                yield rec
    finally:
        bar.close()
        elapsed = time.perf_counter() - t0
        clean["seconds"] += elapsed


def filter_stream(records: Iterable[dict], report: Report, models: Sequence[str],
                  condition_map: dict[str, tuple[str, float]] | None) -> Iterator[dict]:
    s = report.step("filter")
    for rec in records:
        s["in"] += 1
        kept, reason, detail = filter_record(rec, list(models), condition_map)
        if kept is None:
            report.drop("filter", reason, _where(rec), rec["id"], f"model label {detail!r}" if detail else "")
            continue
        s["out"] += 1
        yield kept


def load_encoder(model_type: str, tokenizer: str | os.PathLike | Any) -> tuple[ConversationEncoder, str, list[str]]:
    """The encoder, the tokenizer fingerprint, and the special tokens that had to be added
    (`mistral-common` lacks `<|end_of_turn|>`; it gets the same id as `ochat model tiny` gives it)."""
    mt = get_model_type(model_type)
    tok = tokenizer if hasattr(tokenizer, "get_vocab") else load_tokenizer(tokenizer)
    added: list[str] = []
    if any(t not in tok.get_vocab() for t in mt.special_tokens):
        added = prepare_tokenizer(tok, mt)
    return ConversationEncoder(mt, tok), tokenizer_fingerprint(tok), added


class JsonArrayWriter:
    """Streams a JSON array to a file (the v1 `--legacy-json` layout)."""

    def __init__(self, path: Path):
        self.f = open(path, "w", encoding="utf-8")
        self.f.write("[")
        self.n = 0

    def write(self, obj: Any) -> None:
        self.f.write(("," if self.n else "") + "\n" + json.dumps(obj, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.f.write("\n]\n" if self.n else "]\n")
        self.f.close()


class Row(NamedTuple):
    id: str
    group: str
    condition: str
    tokens: np.ndarray
    weights: np.ndarray
    text_line: str  # {"id", "text", "conversation", "model"} as one JSON line


class SplitWriter:
    """Parquet + text JSONL (+ legacy JSON) of one split, written in the work folder."""

    def __init__(self, work: Path, prefix: str, split: str, model_type: str, fingerprint: str,
                 legacy_json: bool, extra_metadata: dict[str, str]):
        self.files = {"parquet": work / f"{prefix}.{split}.parquet", "text": work / f"{prefix}.{split}.text.jsonl"}
        self.parquet = TokenizedWriter(self.files["parquet"], model_type, fingerprint, extra_metadata)
        self.text = open(self.files["text"], "w", encoding="utf-8")
        self.legacy = self.legacy_text = None
        if legacy_json:
            self.files["legacy"] = work / f"{prefix}.{split}.json"
            self.files["legacy_text"] = work / f"{prefix}.{split}.text.json"
            self.legacy = JsonArrayWriter(self.files["legacy"])
            self.legacy_text = JsonArrayWriter(self.files["legacy_text"])
        self.rows = 0
        self.tokens = 0
        self.trained_tokens = 0

    def write(self, row: Row) -> None:
        self.parquet.write(row.id, row.condition, row.tokens, row.weights)
        self.text.write(row.text_line + "\n")
        if self.legacy:
            self.legacy.write([row.tokens.tolist(), (row.weights > 0).tolist()])
            self.legacy_text.write(json.loads(row.text_line)["text"])
        self.rows += 1
        self.tokens += len(row.tokens)
        self.trained_tokens += int(np.count_nonzero(row.weights > 0))

    def close(self) -> None:
        self.parquet.close()
        self.text.close()
        if self.legacy:
            self.legacy.close()
            self.legacy_text.close()

    def abort(self) -> None:
        self.parquet.abort()
        self.text.close()
        for w in (self.legacy, self.legacy_text):
            if w:
                w.f.close()


def fit_tokenize_stream(lines: Iterable[str], report: Report, encoder: ConversationEncoder, fit_mode: str,
                        max_context: int, workers: int, progress: bool, total: int | None = None) -> Iterator[Row]:
    """Canonical JSONL lines -> rows, fitted to the context and tokenized in the workers."""
    fit, tok = report.step("fit"), report.step("tokenize")
    fitter = Fitter(encoder, fit_mode, max_context)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="fit + tokenize", unit="conv", disable=not progress, dynamic_ncols=True)
    try:
        for stats, rows, cut in parallel_map(_fit_tokenize_chunk, _chunks(lines, 64), workers, {"fitter": fitter}):
            bar.update(len(stats))
            for id_, where, n_pieces, dropped, truncated in stats:
                fit["in"] += 1
                for reason, detail in dropped:
                    report.drop("fit", reason, where, id_, detail)
                if truncated:
                    fit["fixed"]["truncated"] += truncated
                if n_pieces + len(dropped) > 1:
                    fit["fixed"]["split_long_conversation"] += 1
            if cut:
                tok["fixed"]["cut_at_context"] += cut
            fit["out"] += len(rows)
            tok["in"] += len(rows)
            tok["out"] += len(rows)
            yield from rows
    finally:
        bar.close()
        tok["seconds"] += time.perf_counter() - t0


def _write_jsonl(lines: Iterable[dict], f) -> int:
    n = 0
    for obj in lines:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        n += 1
    return n


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def _clean_stale(out: Path, prefix: str) -> None:
    for stale in out.glob(f".{prefix}.pipeline-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def run_pipeline(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, model_type: str,
                 tokenizer: str | os.PathLike | Any, condition_map: dict | str | None = None,
                 models: Sequence[str] | str | None = None, blocked_words: Sequence[str] = ("openai",),
                 dedup: bool = True, fit_mode: str | None = None, max_context: int | None = None,
                 eval_ratio: float = 0.01, seed: int = 42, legacy_json: bool = False,
                 workers: int | None = None, progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    """Run every step and write `out/MODEL_TYPE.{train,eval}.parquet`, `.text.jsonl`, the report
    `MODEL_TYPE.report.json` and the drop log `MODEL_TYPE.dropped.jsonl` (all atomically).

    `models`: model labels to keep (default GPT-4; "any" keeps all); ignored when `condition_map`
    ({label: (condition, weight)}, JSON text, a JSON file or 'GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1') is given.
    Returns the report as a dict (also saved as JSON)."""
    t_start = time.perf_counter()
    if not inputs:
        raise OchatError("no input given (ShareGPT pages, JSON dumps or ochat JSONL)")
    mt = get_model_type(model_type)
    cmap = parse_condition_map(condition_map)
    model_list = parse_models(models)
    fit_mode = fit_mode or default_fit_mode(mt.name)
    if fit_mode not in ("truncate", "split"):
        raise OchatError(f"--fit {fit_mode}: expected 'truncate' or 'split'")
    max_context = max_context or mt.max_context
    workers = workers if workers is not None else (os.cpu_count() or 1)
    encoder, fingerprint, added = load_encoder(model_type, tokenizer)
    prefix = model_type
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale(out, prefix)
    work = Path(tempfile.mkdtemp(prefix=f".{prefix}.pipeline-", suffix=".tmp", dir=out))
    report = Report(work / f"{prefix}.dropped.jsonl")
    report.info.update({
        "inputs": [str(p) for p in inputs], "model_type": model_type, "tokenizer": str(tokenizer),
        "tokenizer_fingerprint": fingerprint, "added_special_tokens": added,
        "models": None if cmap else model_list, "condition_map": cmap, "fit_mode": fit_mode,
        "max_context": max_context, "eval_ratio": eval_ratio, "seed": seed, "workers": workers,
        "blocked_words": list(blocked_words), "dedup": dedup})
    for name in ("read", "clean", "filter", "split", "fit", "tokenize"):
        report.step(name)
    writers: list[SplitWriter] = []
    try:
        # pass 1: read, clean, dedup, filter -> work file; remember the group ids
        groups: list[str] = []
        filtered_path = work / "filtered.jsonl"
        with open(filtered_path, "w", encoding="utf-8") as f:
            records = filter_stream(clean_stream(inputs, report, blocked_words, dedup, workers, progress, out),
                                    report, model_list, cmap)
            for rec in records:
                groups.append(rec["group"])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        # split by group
        t0 = time.perf_counter()
        eval_groups = choose_eval_groups(groups, eval_ratio, seed)
        sp = report.step("split")
        sp["in"] = sp["out"] = len(groups)
        sp["eval_groups"] = len(eval_groups)
        sp["seconds"] = time.perf_counter() - t0

        # pass 2: fit + tokenize -> Parquet, text JSONL (+ legacy JSON)
        meta = {"fit_mode": fit_mode, "max_context": str(max_context), "seed": str(seed),
                "eval_ratio": str(eval_ratio)}
        train = SplitWriter(work, prefix, "train", model_type, fingerprint, legacy_json, meta)
        writers.append(train)
        evals = SplitWriter(work, prefix, "eval", model_type, fingerprint, legacy_json, meta)
        writers.append(evals)
        for row in fit_tokenize_stream(_read_lines(filtered_path), report, encoder, fit_mode, max_context,
                                       workers, progress, total=len(groups)):
            (evals if row.group in eval_groups else train).write(row)
        for w in writers:
            w.close()
        writers = []
        filtered_path.unlink()

        report.info["outputs"] = {
            split: {"rows": w.rows, "tokens": w.tokens, "trained_tokens": w.trained_tokens,
                    **{k: str(out / p.name) for k, p in w.files.items()}}
            for split, w in (("train", train), ("eval", evals))}
        report.info["seconds"] = round(time.perf_counter() - t_start, 3)
        report.close()
        result = report.to_dict()
        (work / f"{prefix}.report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        # every file is complete: move them into place
        umask = os.umask(0)
        os.umask(umask)
        for p in sorted(work.iterdir()):
            os.chmod(p, 0o666 & ~umask)  # temp files are private; results are ordinary files
            os.replace(p, out / p.name)
    finally:
        for w in writers:
            w.abort()
        report.close()
        shutil.rmtree(work, ignore_errors=True)
    if print_table:
        report.print_table()
        print(f"wrote {result['outputs']['train']['rows']} train / {result['outputs']['eval']['rows']} eval "
              f"conversations to {out}/{prefix}.{{train,eval}}.parquet (+ .text.jsonl, report.json) "
              f"in {result['seconds']:.1f}s", file=sys.stderr)
    return result
