"""The data pipeline: raw ShareGPT pages / dumps / ochat JSONL -> a pre-tokenized, C-RLFT-labelled set.

    read -> clean (+ exact dedup) -> filter / label -> split -> fit -> tokenize

Every command is the same run, configured by one `DataConfig`: which steps, which options. The
work is one streaming pass: the inputs are read in batches, and `parallel_map` spreads the batches
over worker processes (`RecordSteps`: read a page, clean, filter, fit, tokenize); the parent applies
the outcomes in input order (`Tally`: exact dedup, unique ids, the counts of the report) and writes
what is kept into a hidden work folder. A split (train/eval) needs every group id first, so rows
are written to a work file and routed to their split at the end; the pieces of one long
conversation share a group and so stay on one side. Outputs are moved into place only when the run
succeeded: a killed run leaves no partial output, and a re-run starts clean.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
from tqdm import tqdm

from ochat.data.clean import DEFAULT_BLOCKED_WORDS, CleanOptions
from ochat.data.filter import parse_condition_map, parse_models
from ochat.data.fit import Fitter, default_fit_mode
from ochat.data.outputs import LineSink, RowSink, Work
from ochat.data.parallel import batched, parallel_map
from ochat.data.report import Report, nothing_kept_hint
from ochat.data.sources import Limits, read_inputs
from ochat.data.split import choose_eval_groups
from ochat.data.steps import Outcome, RecordSteps, StepConfig
from ochat.errors import OchatError
from ochat.models.tokenizers import load_prepared_tokenizer, tokenizer_fingerprint
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import get_model_type

BATCH = 64
ALL_STEPS = ("read", "clean", "filter", "split", "fit", "tokenize")


@dataclass
class DataConfig:
    """One run of the data steps. `steps` names the steps that run, in `ALL_STEPS` order."""
    inputs: list[Path]
    steps: tuple[str, ...] = ALL_STEPS
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS
    dedup: bool = True
    models: list[str] = field(default_factory=lambda: ["GPT-4"])
    condition_map: dict[str, tuple[str, float]] | None = None
    model_type: str | None = None
    tokenizer: Any = None
    fit_mode: str | None = None
    max_context: int | None = None
    eval_ratio: float = 0.01
    seed: int = 42
    legacy_json: bool = False
    workers: int = 1
    progress: bool = True
    limits: Limits = Limits()
    eval_file: Path | None = None  # tokenize: the conversations of this input form the eval split

    def info(self) -> dict[str, Any]:
        return {"inputs": [str(p) for p in self.inputs], "steps": list(self.steps),
                "blocked_words": list(self.blocked_words), "dedup": self.dedup,
                "models": None if self.condition_map else self.models, "condition_map": self.condition_map,
                "eval_ratio": self.eval_ratio, "seed": self.seed, "workers": self.workers,
                "limits": {"max_record_bytes": self.limits.max_record_bytes,
                           "max_message_chars": self.limits.max_message_chars, "max_depth": self.limits.max_depth}}


def load_encoder(model_type: str, tokenizer: str | os.PathLike | Any) -> tuple[ConversationEncoder, str, list[str]]:
    """The encoder, the tokenizer fingerprint, and the special tokens that had to be added."""
    mt = get_model_type(model_type)
    tok, added = load_prepared_tokenizer(tokenizer, mt)
    return ConversationEncoder(mt, tok), tokenizer_fingerprint(tok), added


# -- the parent's side: outcomes applied in order ---------------------------------------------------

class Tally:
    """Applies the workers' outcomes in input order: counts, drops, exact dedup, unique ids."""

    def __init__(self, report: Report, steps: tuple[str, ...], dedup: bool, eval_file: Path | None = None):
        self.report, self.steps, self.dedup = report, steps, dedup
        self.eval_prefix = f"{eval_file}:" if eval_file else None
        self.eval_groups: set[str] = set()
        self.seen_hashes: set[bytes] = set()
        self.seen_ids: dict[str, int] = {}
        self.groups: list[str] = []
        self.kept = 0

    def apply(self, o: Outcome) -> str | None:
        """The record's id if it is kept (renamed when an earlier record had its id), else None."""
        r, s = self.report, self.report.steps
        s["read"]["in"] += 1
        if o.drop and o.drop[0] == "read":
            r.drop("read", o.drop[1], o.where, "", o.drop[2])
            return None
        s["read"]["out"] += 1
        s["clean"]["in"] += 1
        for fix in o.fixes:
            s["clean"]["fixed"][fix] += 1
        if o.drop and o.drop[0] == "clean":
            r.drop("clean", o.drop[1], o.where, o.id, o.drop[2])
            return None
        if self.dedup:
            h = bytes.fromhex(o.hash)
            if h in self.seen_hashes:
                r.drop("clean", "duplicate", o.where, o.id, "same text as an earlier conversation")
                return None
            self.seen_hashes.add(h)
        new_id = self._unique_id(o)
        s["clean"]["out"] += 1
        if "filter" in self.steps:
            s["filter"]["in"] += 1
            if o.drop and o.drop[0] == "filter":
                r.drop("filter", o.drop[1], o.where, o.id, o.drop[2])
                return None
            s["filter"]["out"] += 1
        self.groups.append(o.group)
        if self.eval_prefix and o.where.startswith(self.eval_prefix):
            self.eval_groups.add(o.group)
        return new_id if self._fit_tokenize(o, new_id) else None

    def _unique_id(self, o: Outcome) -> str:
        n = self.seen_ids[o.id] = self.seen_ids.get(o.id, 0) + 1
        if n == 1:
            return o.id
        # distinct conversations sharing an id get distinct ids
        self.report.steps["clean"]["fixed"]["renamed_duplicate_id"] += 1
        new_id = f"{o.id}~{n}"
        if o.group == o.id:
            o.group = new_id
        return new_id

    def _fit_tokenize(self, o: Outcome, new_id: str) -> bool:
        r, s = self.report, self.report.steps
        if "fit" in self.steps:
            s["fit"]["in"] += 1
            if o.drop:  # an error while fitting or tokenizing
                r.drop(o.drop[0], o.drop[1], o.where, new_id, o.drop[2])
                return False
            for reason, detail in o.fit_drops:
                r.drop("fit", reason, o.where, new_id, detail)
            if o.truncated:
                s["fit"]["fixed"]["truncated"] += o.truncated
            if o.n_pieces + len(o.fit_drops) > 1:
                s["fit"]["fixed"]["split_long_conversation"] += 1
            s["fit"]["out"] += o.n_pieces
        if "tokenize" in self.steps:
            s["tokenize"]["in"] += o.n_pieces
            s["tokenize"]["out"] += o.n_pieces
            if o.cut:
                s["tokenize"]["fixed"]["cut_at_context"] += o.cut
        n_out = o.n_pieces if "fit" in self.steps else 1
        self.kept += n_out
        return n_out > 0


def _renamed(line: str, old: str, new: str, group: str) -> str:
    rec = json.loads(line)
    rec["id"] = new + rec["id"][len(old):]  # a piece "ID_1" of "ID" becomes "ID~2_1"
    if "group" in rec:
        rec["group"] = group
    return json.dumps(rec, ensure_ascii=False)


def _process(cfg: DataConfig, tally: Tally, step_cfg: StepConfig, sink, exclude: Iterable[Path]) -> None:
    """The one pass: read -> workers -> outcomes applied in order -> `sink.lines` / `sink.rows`."""
    items = read_inputs(cfg.inputs, exclude, defer_pages=True, limits=cfg.limits)
    bar = tqdm(desc="data", unit="conv", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for outcomes, table, seconds in parallel_map(RecordSteps(step_cfg), batched(items, BATCH), cfg.workers):
            for step, sec in seconds.items():  # CPU seconds in the workers
                tally.report.steps[step]["cpu_seconds"] = tally.report.steps[step].get("cpu_seconds", 0.0) + sec
            keep_rows: list[int] = []
            renames: dict[int, tuple[str, str, str]] = {}
            for o in outcomes:
                new_id = tally.apply(o)
                if new_id is None:
                    continue
                if table is not None:
                    keep_rows.extend(range(*o.rows))
                    if new_id != o.id:
                        renames.update({i: (o.id, new_id, o.group) for i in range(*o.rows)})
                else:
                    sink.lines([_renamed(x, o.id, new_id, o.group) if new_id != o.id else x for x in o.lines],
                               o.group, o.where)
            if table is not None and keep_rows:
                kept = table if len(keep_rows) == table.num_rows else table.take(keep_rows)
                sink.rows(_rename_rows(kept, [renames.get(i) for i in keep_rows]))
            bar.update(len(outcomes))
    finally:
        bar.close()
        tally.report.info["pass_seconds"] = round(time.perf_counter() - t0, 3)


def _rename_rows(table: pa.Table, renames: list[tuple[str, str, str] | None]) -> pa.Table:
    if not any(renames):
        return table
    ids, groups, texts = (table.column(c).to_pylist() for c in ("id", "group", "text"))
    for i, rn in enumerate(renames):
        if rn:
            old, new, group = rn
            ids[i], groups[i] = new + ids[i][len(old):], group
            texts[i] = _renamed(texts[i], old, new, group)
    return table.set_column(0, "id", pa.array(ids, pa.string())).set_column(
        1, "group", pa.array(groups, pa.string())).set_column(5, "text", pa.array(texts, pa.string()))


# -- runs -------------------------------------------------------------------------------------------

def _check_paths(inputs: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Inputs exist, and no output would replace an input file named on the command line (an output
    inside an input folder is left out of the reading instead)."""
    if not inputs:
        raise OchatError("no input given (ShareGPT pages, JSON dumps or ochat JSONL)")
    for p in inputs:
        if not Path(p).exists():
            raise OchatError(f"input {p}: no such file or directory")
    named = {Path(p).resolve() for p in inputs if Path(p).is_file()}
    for out in outputs:
        if Path(out).resolve() in named:
            raise OchatError(f"--out {out}: is also an input; an output never overwrites an input "
                             f"(choose another --out)")


def _run(cfg: DataConfig, out_dir: Path, prefix: str, outputs: list[Path], make_sink, finish,
         names: dict[str, str]) -> dict[str, Any]:
    """Everything a data command does: check, one pass (`_process`), `finish` (route, name the files),
    refuse a run that kept nothing, move the outputs into place. Returns the report."""
    _check_paths(cfg.inputs, outputs)
    t0 = time.perf_counter()
    work = Work(out_dir, prefix)
    report = Report(cfg.steps, work.path / "dropped.jsonl")
    report.info.update(cfg.info())
    try:
        tally = Tally(report, cfg.steps, cfg.dedup, cfg.eval_file)
        sink, step_cfg = make_sink(work.path)
        _process(cfg, tally, step_cfg, sink, exclude=outputs)
        summary = finish(sink, tally, report)
        report.info["seconds"] = round(time.perf_counter() - t0, 3)
        report.close()
        result = report.to_dict()
        if tally.kept == 0:
            raise OchatError(nothing_kept_hint(result))
        result["summary"] = [summary + f" in {result['seconds']:.1f}s (report: {names['report.json']})"]
        (work.path / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        work.commit(names)
    finally:
        report.close()
        work.cleanup()
    return result


def _lines_run(cfg: DataConfig, out: Path, step_cfg: StepConfig) -> dict[str, Any]:
    """clean / filter / fit: canonical JSONL in (or anything, for clean), one canonical JSONL out."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    names = {"out.jsonl": out.name, "report.json": f"{stem}.report.json", "dropped.jsonl": f"{stem}.dropped.jsonl"}
    outputs = [out.parent / n for n in names.values()]

    def finish(sink: LineSink, tally: Tally, report: Report) -> str:
        report.info.update(sink.finish(None))
        return f"wrote {tally.kept} conversations to {out}"
    return _run(cfg, out.parent, out.name, outputs, lambda work: (LineSink(work, {"out": out}), step_cfg),
                finish, names)


def _canonical(cfg: DataConfig, steps: tuple[str, ...]) -> DataConfig:
    """The later steps read canonical JSONL: checked again for format only (no blocked words, no dedup)."""
    return replace(cfg, steps=steps, blocked_words=(), dedup=False)


def _step_config(cfg: DataConfig, fitter: Fitter | None = None, lines: bool = False) -> StepConfig:
    return StepConfig(steps=cfg.steps, clean=CleanOptions(cfg.blocked_words, cfg.limits.max_message_chars),
                      limits=cfg.limits, models=cfg.models, condition_map=cfg.condition_map, fitter=fitter,
                      lines=lines)


def _workers(workers: int | None) -> int:
    return workers if workers is not None else (os.cpu_count() or 1)


def _fitter(model_type: str, tokenizer: Any, fit_mode: str | None, max_context: int | None
            ) -> tuple[Fitter, str, list[str]]:
    mt = get_model_type(model_type)
    fit_mode = fit_mode or default_fit_mode(mt.name)
    if fit_mode not in ("truncate", "split"):
        raise OchatError(f"--fit {fit_mode}: expected 'truncate' or 'split'")
    encoder, fingerprint, added = load_encoder(model_type, tokenizer)
    return Fitter(encoder, fit_mode, max_context or mt.max_context), fingerprint, added


def run_clean(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, blocked_words: Sequence[str] = ("openai",),
              dedup: bool = True, workers: int | None = None, progress: bool = True,
              limits: Limits = Limits()) -> dict[str, Any]:
    """Read and clean any inputs into one canonical JSONL file (records keep their `model` label)."""
    cfg = DataConfig([Path(p) for p in inputs], ("read", "clean"), tuple(blocked_words), dedup,
                     workers=_workers(workers), progress=progress, limits=limits)
    return _lines_run(cfg, Path(out), _step_config(cfg, lines=True))


def run_filter(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, models: Sequence[str] | str | None = None,
               condition_map: dict | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Keep conversations by model label, or label them for C-RLFT."""
    cmap = parse_condition_map(condition_map)
    cfg = _canonical(DataConfig([Path(p) for p in inputs], models=parse_models(models), condition_map=cmap,
                                progress=progress), ("read", "clean", "filter"))
    return _lines_run(cfg, Path(out), _step_config(cfg, lines=True))


def run_fit(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, model_type: str,
            tokenizer: str | os.PathLike | Any, fit_mode: str | None = None, max_context: int | None = None,
            workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Truncate or split conversations to the model type's context."""
    fitter, fingerprint, _ = _fitter(model_type, tokenizer, fit_mode, max_context)
    cfg = _canonical(DataConfig([Path(p) for p in inputs], workers=_workers(workers), progress=progress,
                                model_type=model_type), ("read", "clean", "fit"))
    cfg_info = {"model_type": fitter.encoder.model_type.name, "fit_mode": fitter.mode,
                "max_context": fitter.max_context, "tokenizer_fingerprint": fingerprint}
    result = _lines_run(cfg, Path(out), _step_config(cfg, fitter, lines=True))
    result.update(cfg_info)
    return result


def run_split(inputs: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, eval_ratio: float = 0.01,
              seed: int = 42, progress: bool = False) -> dict[str, Any]:
    """Write OUT_PREFIX.train.jsonl and OUT_PREFIX.eval.jsonl (pieces of one conversation stay together)."""
    prefix = Path(out_prefix)
    cfg = _canonical(DataConfig([Path(p) for p in inputs], eval_ratio=eval_ratio, seed=seed, progress=progress),
                     ("read", "clean", "split"))
    names = {"train.jsonl": f"{prefix.name}.train.jsonl", "eval.jsonl": f"{prefix.name}.eval.jsonl",
             "report.json": f"{prefix.name}.split.report.json", "dropped.jsonl": f"{prefix.name}.split.dropped.jsonl"}
    paths = {s: prefix.parent / names[f"{s}.jsonl"] for s in ("train", "eval")}

    def finish(sink: LineSink, tally: Tally, report: Report) -> str:
        eval_groups = choose_eval_groups(tally.groups, eval_ratio, seed)
        report.info.update(sink.finish(lambda g: g in eval_groups))
        s = report.steps["split"]
        s["in"] = s["out"] = len(tally.groups)
        s["notes"].update(sink.counts)
        return f"wrote {sink.counts['train']} train / {sink.counts['eval']} eval conversations to {prefix}.{{train,eval}}.jsonl"
    choose_eval_groups([], eval_ratio, seed)  # checks --eval-ratio before any work
    return _run(cfg, prefix.parent, prefix.name, [prefix.parent / n for n in names.values()],
                lambda work: (LineSink(work, paths), _step_config(cfg, lines=True)), finish, names)


def _rows_run(cfg: DataConfig, out: Path, prefix: str, fitter: Fitter, fingerprint: str, added: list[str],
              eval_groups_of, meta: dict[str, str]) -> dict[str, Any]:
    """pipeline / tokenize: rows routed into OUT/PREFIX.{train,eval}.parquet + .text.jsonl (+ v1 JSON)."""
    exts = ["parquet", "text.jsonl"] + (["json", "text.json"] if cfg.legacy_json else [])
    names = {f"{prefix}.{s}.{e}": f"{prefix}.{s}.{e}" for s in ("train", "eval") for e in exts}
    names.update({"report.json": f"{prefix}.report.json", "dropped.jsonl": f"{prefix}.dropped.jsonl"})
    outputs = [out / n for n in names.values()] + [out / f"{prefix}.{s}.{e}" for s in ("train", "eval")
                                                      for e in ("json", "text.json")]
    mt = fitter.encoder.model_type
    cfg.__dict__.update(model_type=mt.name, fit_mode=fitter.mode, max_context=fitter.max_context)

    def make_sink(work: Path):
        sink = RowSink(work, prefix, mt.name, fingerprint, cfg.legacy_json, meta)
        return sink, _step_config(cfg, fitter)

    def finish(sink: RowSink, tally: Tally, report: Report) -> str:
        eval_groups = eval_groups_of(tally)
        report.info["outputs"] = o = sink.finish(eval_groups, out)
        return (f"wrote {o['train']['rows']} train / {o['eval']['rows']} eval conversations to "
                f"{out}/{prefix}.{{train,eval}}.parquet and .text.jsonl")
    result = _run(cfg, out, prefix, outputs, make_sink, finish, names)
    result.update({"model_type": mt.name, "tokenizer": str(cfg.tokenizer), "tokenizer_fingerprint": fingerprint,
                   "added_special_tokens": added, "fit_mode": fitter.mode, "max_context": fitter.max_context})
    return result


def run_pipeline(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, model_type: str,
                 tokenizer: str | os.PathLike | Any, condition_map: dict | str | None = None,
                 models: Sequence[str] | str | None = None, blocked_words: Sequence[str] = ("openai",),
                 dedup: bool = True, fit_mode: str | None = None, max_context: int | None = None,
                 eval_ratio: float = 0.01, seed: int = 42, legacy_json: bool = False,
                 workers: int | None = None, progress: bool = True, limits: Limits = Limits()) -> dict[str, Any]:
    """Run every step and write `out/MODEL_TYPE.{train,eval}.parquet`, `.{train,eval}.text.jsonl`, the
    report `MODEL_TYPE.report.json` and the drop log `MODEL_TYPE.dropped.jsonl`, all at once at the end.

    `models`: model labels to keep (default GPT-4; "any" keeps all); not used when `condition_map`
    ({label: (condition, weight)}, JSON text, a JSON file or 'GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1') is given.
    `tokenizer`: a HF tokenizer directory, 'mistral-common', or a loaded tokenizer.
    Returns the report (also saved as JSON)."""
    _check_paths([Path(p) for p in inputs], [])
    cmap = parse_condition_map(condition_map)
    choose_eval_groups([], eval_ratio, seed)  # checks --eval-ratio before any work
    fitter, fingerprint, added = _fitter(model_type, tokenizer, fit_mode, max_context)
    cfg = DataConfig([Path(p) for p in inputs], ALL_STEPS, tuple(blocked_words), dedup, parse_models(models), cmap,
                     tokenizer=tokenizer, eval_ratio=eval_ratio, seed=seed, legacy_json=legacy_json,
                     workers=_workers(workers), progress=progress, limits=limits)

    def eval_groups_of(tally: Tally) -> set[str]:
        groups = choose_eval_groups(tally.groups, eval_ratio, seed)
        s = tally.report.steps["split"]
        s["in"] = s["out"] = len(tally.groups)
        s["notes"]["eval_conversations"] = len(groups)
        return groups
    meta = {"fit_mode": fitter.mode, "max_context": str(fitter.max_context), "seed": str(seed),
            "eval_ratio": str(eval_ratio), "condition_map": json.dumps(cmap) if cmap else ""}
    return _rows_run(cfg, Path(out), model_type, fitter, fingerprint, added, eval_groups_of, meta)


def run_tokenize(train: str | os.PathLike, eval: str | os.PathLike | None, out: str | os.PathLike, model_type: str,
                 tokenizer: str | os.PathLike | Any, fit_mode: str | None = None, max_context: int | None = None,
                 legacy_json: bool = False, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokenize canonical JSONL splits into `out/MODEL_TYPE.{train,eval}.parquet` (+ text JSONL).
    Conversations longer than the context are fitted first (a no-op after `ochat data fit`)."""
    inputs = [Path(train)] + ([Path(eval)] if eval else [])
    _check_paths(inputs, [])
    fitter, fingerprint, added = _fitter(model_type, tokenizer, fit_mode, max_context)
    mt = fitter.encoder.model_type
    prefix = mt.name if model_type == mt.name else model_type
    cfg = _canonical(DataConfig(inputs, tokenizer=tokenizer, legacy_json=legacy_json, workers=_workers(workers),
                                progress=progress, eval_file=Path(eval) if eval else None),
                     ("read", "clean", "fit", "tokenize"))

    def eval_groups_of(tally: Tally) -> set[str]:  # by the file a conversation came from
        return tally.eval_groups
    meta = {"fit_mode": fitter.mode, "max_context": str(fitter.max_context)}
    return _rows_run(cfg, Path(out), prefix, fitter, fingerprint, added, eval_groups_of, meta)
