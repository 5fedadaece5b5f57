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
from ochat.data.fit import FitResult, Fitter, default_fit_mode, to_conversation
from ochat.data.sources import Bad, RawRecord, read_file, read_inputs
from ochat.data.split import choose_eval_groups
from ochat.data.tokenize import tokenize_records
from ochat.data.tokenized import TokenizedWriter
from ochat.errors import OchatError
from ochat.models.tokenizers import load_prepared_tokenizer, tokenizer_fingerprint
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import get_model_type

EXAMPLES_PER_REASON = 5
OUTPUT_NAMES = [f"{split}.{ext}" for split in ("train", "eval") for ext in ("parquet", "text.jsonl", "json", "text.json")] \
    + ["report.json", "dropped.jsonl"]


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
                                            "notes": Counter(), "examples": {}, "seconds": 0.0})

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
                        "notes": dict(s["notes"]),
                        "examples": s["examples"], "seconds": round(s["seconds"], 3)}
                 for name, s in self.steps.items()}
        return {"ochat_version": ochat.__version__, **self.info, "steps": steps}

    def print_table(self, file=None) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="ochat data: conversations per step")
        for col in ("step", "in", "out", "dropped / fixed", "count", "example"):
            table.add_column(col, overflow="fold")
        for name, s in self.steps.items():
            table.add_row(name, str(s["in"]), str(s["out"]), "", "", "", style="bold")
            for reason, n in s["dropped"].most_common():
                ex = s["examples"].get(reason, [{}])[0]
                table.add_row("", "", "", reason, str(n), escape(f"{ex.get('where', '')} {ex.get('detail', '')}".strip()))
            for fix, n in s["fixed"].most_common():
                table.add_row("", "", "", f"(fixed) {fix}", str(n), "")
            for note, n in s["notes"].most_common():
                table.add_row("", "", "", f"(note) {note}", str(n), "")
        Console(file=file or sys.stderr, width=140).print(table)


# -- order-preserving parallel map with bounded memory ----------------------------------------------

_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.update(state)  # no clear(): in-process steps nest (fit reads through clean)


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
            if isinstance(rec, RawRecord):  # send back only what the parent needs, not the raw HTML
                out.append(((rec.where, rec.id), clean_record(rec, options)))
            else:
                out.append((rec, None))
    return out


def _fit_tokenize_chunk(lines: list[str]) -> tuple[list, list, int]:
    """Work file lines -> per-record fit counts, and rows ready to write (numpy ids, a text JSONL line)."""
    fitter: Fitter = _STATE["fitter"]
    records = [json.loads(line) for line in lines]
    # Encode everything once; only what does not fit is fitted and encoded again.
    tokens, weights = fitter.encoder.encode([to_conversation(r) for r in records])
    fits, encoded = [], {}
    for r, t, w in zip(records, tokens, weights):
        if len(t) <= fitter.max_context:
            fits.append(FitResult(pieces=[r]))
            encoded[id(r)] = (t, w)
        else:
            fits.append(fitter.fit(r))
    pieces = [p for f in fits for p in f.pieces]
    again = [p for p in pieces if id(p) not in encoded]
    if again:
        encoded.update(zip(map(id, again), zip(*fitter.encoder.encode([to_conversation(p) for p in again]))))
    rows, cut = tokenize_records(fitter.encoder, pieces, fitter.max_context,
                                 encoded=([encoded[id(p)][0] for p in pieces], [encoded[id(p)][1] for p in pieces])) \
        if pieces else ([], 0)
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
                 dedup: bool = True, workers: int = 1, progress: bool = True, exclude: Iterable[Path] = ()) -> Iterator[dict]:
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
                where, id_ = item
                read["out"] += 1
                clean["in"] += 1
                res: CleanResult
                for fix in res.fixes:
                    clean["fixed"][fix] += 1
                if res.record is None:
                    report.drop("clean", res.reason, where, id_, res.detail)
                    continue
                if dedup:
                    h = bytes.fromhex(res.hash)
                    if h in seen_hashes:
                        report.drop("clean", "duplicate", where, id_, "same text as an earlier conversation")
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
    """The encoder, the tokenizer fingerprint, and the special tokens that had to be added."""
    mt = get_model_type(model_type)
    tok, added = load_prepared_tokenizer(tokenizer, mt)
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


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def _check_inputs(inputs: Sequence[str | os.PathLike]) -> None:
    if not inputs:
        raise OchatError("no input given (ShareGPT pages, JSON dumps or ochat JSONL)")
    for p in inputs:
        if not Path(p).exists():
            raise OchatError(f"input {p}: no such file or directory")


class _Work:
    """A hidden work folder next to the outputs; its files are moved into place only on success."""

    def __init__(self, out_dir: Path, prefix: str):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{prefix}.pipeline-*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{prefix}.pipeline-", suffix=".tmp", dir=out_dir))

    def commit(self, names: dict[Path, str] | None = None) -> None:
        """Move every file of the work folder into place (renamed per `names`)."""
        umask = os.umask(0)
        os.umask(umask)
        names = names or {}
        for p in sorted(self.path.iterdir()):
            if p.is_file():
                os.chmod(p, 0o666 & ~umask)  # temp files are private; results are ordinary files
                os.replace(p, self.out_dir / names.get(p, p.name))

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _finish(report: Report, report_path: Path, t_start: float, print_table: bool) -> dict[str, Any]:
    report.info["seconds"] = round(time.perf_counter() - t_start, 3)
    report.close()
    result = report.to_dict()
    report_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def _tokenize_splits(work: Path, prefix: str, lines: Iterable[str], route: Callable[[str], str],
                     report: Report, encoder: ConversationEncoder, fingerprint: str, fit_mode: str,
                     max_context: int, legacy_json: bool, workers: int, progress: bool, total: int | None,
                     out_dir: Path, meta: dict[str, str]) -> dict[str, Any]:
    """Fit + tokenize `lines` into the train and eval files of the work folder; `route(group)` picks the split."""
    writers = {split: SplitWriter(work, prefix, split, encoder.model_type.name, fingerprint, legacy_json, meta)
               for split in ("train", "eval")}
    try:
        for row in fit_tokenize_stream(lines, report, encoder, fit_mode, max_context, workers, progress, total):
            writers[route(row.group)].write(row)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {split: {"rows": w.rows, "tokens": w.tokens, "trained_tokens": w.trained_tokens,
                    **{k: str(out_dir / p.name) for k, p in w.files.items()}}
            for split, w in writers.items()}


def run_pipeline(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, model_type: str,
                 tokenizer: str | os.PathLike | Any, condition_map: dict | str | None = None,
                 models: Sequence[str] | str | None = None, blocked_words: Sequence[str] = ("openai",),
                 dedup: bool = True, fit_mode: str | None = None, max_context: int | None = None,
                 eval_ratio: float = 0.01, seed: int = 42, legacy_json: bool = False,
                 workers: int | None = None, progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    """Run every step and write `out/MODEL_TYPE.{train,eval}.parquet`, `.{train,eval}.text.jsonl`, the
    report `MODEL_TYPE.report.json` and the drop log `MODEL_TYPE.dropped.jsonl`, all at once at the end.

    `models`: model labels to keep (default GPT-4; "any" keeps all); not used when `condition_map`
    ({label: (condition, weight)}, JSON text, a JSON file or 'GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1') is given.
    `tokenizer`: a HF tokenizer directory, 'mistral-common', or a loaded tokenizer.
    Returns the report (also saved as JSON)."""
    t_start = time.perf_counter()
    _check_inputs(inputs)
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
    work = _Work(out, prefix)
    report = Report(work.path / f"{prefix}.dropped.jsonl")
    for name in ("read", "clean", "filter", "split", "fit", "tokenize"):
        report.step(name)
    report.info.update({
        "inputs": [str(p) for p in inputs], "model_type": mt.name, "tokenizer": str(tokenizer),
        "tokenizer_fingerprint": fingerprint, "added_special_tokens": added,
        "models": None if cmap else model_list, "condition_map": cmap, "fit_mode": fit_mode,
        "max_context": max_context, "eval_ratio": eval_ratio, "seed": seed, "workers": workers,
        "blocked_words": list(blocked_words), "dedup": dedup})
    try:
        # pass 1: read, clean, dedup, filter -> work file; remember only the group ids
        groups: list[str] = []
        filtered_path = work.path / "filtered.jsonl.work"
        with open(filtered_path, "w", encoding="utf-8") as f:
            outputs = [out / f"{prefix}.{name}" for name in OUTPUT_NAMES]
            for rec in filter_stream(clean_stream(inputs, report, blocked_words, dedup, workers, progress, outputs),
                                     report, model_list, cmap):
                groups.append(rec["group"])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        sp = report.step("split")
        eval_groups = choose_eval_groups(groups, eval_ratio, seed)
        sp["in"] = sp["out"] = len(groups)
        sp["notes"]["eval_conversations"] = len(eval_groups)

        # pass 2: fit + tokenize -> Parquet, text JSONL (+ legacy JSON)
        meta = {"fit_mode": fit_mode, "max_context": str(max_context), "seed": str(seed),
                "eval_ratio": str(eval_ratio), "condition_map": json.dumps(cmap) if cmap else ""}
        report.info["outputs"] = _tokenize_splits(
            work.path, prefix, _read_lines(filtered_path), lambda g: "eval" if g in eval_groups else "train",
            report, encoder, fingerprint, fit_mode, max_context, legacy_json, workers, progress, len(groups),
            out, meta)
        filtered_path.unlink()
        result = _finish(report, work.path / f"{prefix}.report.json", t_start, print_table)
        work.commit()
    finally:
        report.close()
        work.cleanup()
    if print_table:
        _print_tokenized(report, result, out, prefix)
    return result


# -- single steps (canonical JSONL in, canonical JSONL out) -----------------------------------------

def _run_jsonl_step(out: Path, t_start: float, print_table: bool, info: dict[str, Any],
                    produce: Callable[[Report, Any], None]) -> dict[str, Any]:
    """Run `produce(report, out_file)` writing `out` (JSONL); the report goes to OUT.report.json."""
    out = Path(out)
    work = _Work(out.parent, out.name)
    report = Report(work.path / "dropped.jsonl")
    report.info.update(info)
    for name in ("read", "clean", info["step"]):
        report.step(name)
    try:
        body = work.path / "out.jsonl"
        with open(body, "w", encoding="utf-8") as f:
            produce(report, f)
        report.info["output"] = str(out)
        result = _finish(report, work.path / "report.json", t_start, print_table)
        stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
        work.commit({body: out.name, work.path / "report.json": f"{stem}.report.json",
                     work.path / "dropped.jsonl": f"{stem}.dropped.jsonl"})
    finally:
        report.close()
        work.cleanup()
    if print_table:
        report.print_table()
        print(f"wrote {result['steps'][info['step']]['out']} conversations to {out}", file=sys.stderr)
    return result


def _print_tokenized(report: Report, result: dict[str, Any], out: Path, prefix: str) -> None:
    report.print_table()
    o = result["outputs"]
    print(f"wrote {o['train']['rows']} train / {o['eval']['rows']} eval conversations to "
          f"{out}/{prefix}.{{train,eval}}.parquet and .text.jsonl (report: {prefix}.report.json) "
          f"in {result['seconds']:.1f}s", file=sys.stderr)


def _dump(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def run_clean(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, blocked_words: Sequence[str] = ("openai",),
              dedup: bool = True, workers: int | None = None, progress: bool = True,
              print_table: bool = True) -> dict[str, Any]:
    """Read and clean any inputs into one canonical JSONL file (records keep their `model` label)."""
    _check_inputs(inputs)
    workers = workers if workers is not None else (os.cpu_count() or 1)

    def produce(report: Report, f) -> None:
        stem = Path(out).with_suffix("")
        outputs = [Path(out), Path(f"{stem}.report.json"), Path(f"{stem}.dropped.jsonl")]
        for rec in clean_stream(inputs, report, blocked_words, dedup, workers, progress, outputs):
            f.write(_dump(rec))
    return _run_jsonl_step(Path(out), time.perf_counter(), print_table,
                           {"step": "clean", "inputs": [str(p) for p in inputs], "blocked_words": list(blocked_words),
                            "dedup": dedup}, produce)


def _canonical(inputs: Sequence[str | os.PathLike], report: Report) -> Iterator[dict]:
    """Canonical JSONL records, checked again (format only: no blocked words, no dedup)."""
    return clean_stream(inputs, report, (), dedup=False, workers=1, progress=False)


def run_filter(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, models: Sequence[str] | str | None = None,
               condition_map: dict | str | None = None, print_table: bool = True) -> dict[str, Any]:
    _check_inputs(inputs)
    cmap = parse_condition_map(condition_map)
    model_list = parse_models(models)

    def produce(report: Report, f) -> None:
        for rec in filter_stream(_canonical(inputs, report), report, model_list, cmap):
            f.write(_dump(rec))
    return _run_jsonl_step(Path(out), time.perf_counter(), print_table,
                           {"step": "filter", "inputs": [str(p) for p in inputs],
                            "models": None if cmap else model_list, "condition_map": cmap}, produce)


def _fit_chunk(records: list[dict]) -> list:
    fitter: Fitter = _STATE["fitter"]
    return [(r, fitter.fit(r)) for r in records]


def run_fit(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, model_type: str,
            tokenizer: str | os.PathLike | Any, fit_mode: str | None = None, max_context: int | None = None,
            workers: int | None = None, progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    _check_inputs(inputs)
    mt = get_model_type(model_type)
    fit_mode = fit_mode or default_fit_mode(mt.name)
    if fit_mode not in ("truncate", "split"):
        raise OchatError(f"--fit {fit_mode}: expected 'truncate' or 'split'")
    encoder, fingerprint, _ = load_encoder(model_type, tokenizer)
    fitter = Fitter(encoder, fit_mode, max_context)
    workers = workers if workers is not None else (os.cpu_count() or 1)

    def produce(report: Report, f) -> None:
        s = report.step("fit")
        for results in parallel_map(_fit_chunk, _chunks(_canonical(inputs, report), 64), workers, {"fitter": fitter}):
            for rec, res in results:
                s["in"] += 1
                for reason, detail in res.dropped:
                    report.drop("fit", reason, _where(rec), rec["id"], detail)
                if res.truncated:
                    s["fixed"]["truncated"] += res.truncated
                if len(res.pieces) + len(res.dropped) > 1:
                    s["fixed"]["split_long_conversation"] += 1
                for piece in res.pieces:
                    s["out"] += 1
                    f.write(_dump(piece))
    return _run_jsonl_step(Path(out), time.perf_counter(), print_table,
                           {"step": "fit", "inputs": [str(p) for p in inputs], "model_type": mt.name,
                            "fit_mode": fit_mode, "max_context": fitter.max_context,
                            "tokenizer_fingerprint": fingerprint}, produce)


def run_split(inputs: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, eval_ratio: float = 0.01,
              seed: int = 42, print_table: bool = True) -> dict[str, Any]:
    """Write OUT_PREFIX.train.jsonl and OUT_PREFIX.eval.jsonl (two passes over the input)."""
    _check_inputs(inputs)
    t_start = time.perf_counter()
    prefix = Path(out_prefix)
    work = _Work(prefix.parent, prefix.name)
    report = Report(None)
    report.info.update({"step": "split", "inputs": [str(p) for p in inputs], "eval_ratio": eval_ratio, "seed": seed})
    try:
        groups = [rec["group"] for rec in _canonical(inputs, Report(None))]
        eval_groups = choose_eval_groups(groups, eval_ratio, seed)
        s = report.step("split")
        counts = Counter()
        paths = {split: work.path / f"{prefix.name}.{split}.jsonl" for split in ("train", "eval")}
        files = {split: open(p, "w", encoding="utf-8") for split, p in paths.items()}
        try:
            for rec in _canonical(inputs, report):
                split = "eval" if rec["group"] in eval_groups else "train"
                files[split].write(_dump(rec))
                counts[split] += 1
        finally:
            for f in files.values():
                f.close()
        s["in"] = s["out"] = len(groups)
        s["notes"].update({"train": counts["train"], "eval": counts["eval"]})
        report.info["outputs"] = {split: str(prefix.parent / p.name) for split, p in paths.items()}
        result = _finish(report, work.path / f"{prefix.name}.split.report.json", t_start, print_table)
        work.commit()
    finally:
        work.cleanup()
    if print_table:
        report.print_table()
        print(f"wrote {counts['train']} train / {counts['eval']} eval conversations to {prefix}.{{train,eval}}.jsonl",
              file=sys.stderr)
    return result


def run_tokenize(train: str | os.PathLike, eval: str | os.PathLike | None, out: str | os.PathLike, model_type: str,
                 tokenizer: str | os.PathLike | Any, fit_mode: str | None = None, max_context: int | None = None,
                 legacy_json: bool = False, workers: int | None = None, progress: bool = True,
                 print_table: bool = True) -> dict[str, Any]:
    """Tokenize canonical JSONL splits into `out/MODEL_TYPE.{train,eval}.parquet` (+ text JSONL).
    Conversations longer than the context are fitted first (a no-op after `ochat data fit`)."""
    t_start = time.perf_counter()
    mt = get_model_type(model_type)
    fit_mode = fit_mode or default_fit_mode(mt.name)
    max_context = max_context or mt.max_context
    workers = workers if workers is not None else (os.cpu_count() or 1)
    encoder, fingerprint, added = load_encoder(model_type, tokenizer)
    out = Path(out)
    prefix = mt.name if model_type == mt.name else model_type
    work = _Work(out, prefix)
    report = Report(work.path / f"{prefix}.dropped.jsonl")
    report.info.update({"step": "tokenize", "train": str(train), "eval": str(eval) if eval else None,
                        "model_type": mt.name, "tokenizer": str(tokenizer), "tokenizer_fingerprint": fingerprint,
                        "added_special_tokens": added, "fit_mode": fit_mode, "max_context": max_context})
    try:
        eval_groups: set[str] = set()

        def lines() -> Iterator[str]:
            for rec in _canonical([train], report):
                yield _dump(rec)
            if eval:
                for rec in _canonical([eval], report):
                    eval_groups.add(rec["group"])
                    yield _dump(rec)
        # route by the file a record came from: eval ids are registered before their rows come back
        report.info["outputs"] = _tokenize_splits(
            work.path, prefix, lines(), lambda g: "eval" if g in eval_groups else "train", report, encoder,
            fingerprint, fit_mode, max_context, legacy_json, workers, progress, None, out,
            {"fit_mode": fit_mode, "max_context": str(max_context)})
        result = _finish(report, work.path / f"{prefix}.report.json", t_start, print_table)
        work.commit()
    finally:
        report.close()
        work.cleanup()
    if print_table:
        _print_tokenized(report, result, out, prefix)
    return result
