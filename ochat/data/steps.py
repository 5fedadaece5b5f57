"""The per-record work of every data step, done in the worker processes, one batch at a time.

`RecordSteps(config)(batch)` reads (a page path), cleans, filters, fits and tokenizes each record of
a batch, as far as the run's steps go, and returns one `Outcome` per input item plus, when it
tokenizes, the rows of the whole batch as one Arrow table. What it computes is only a proposal: the
parent process applies the outcomes in order, dropping exact duplicates (which needs every earlier
record) before it counts a record at the filter step. A record that raises anything becomes a drop
with the exception as its reason: no record can stop the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from ochat.data.clean import CleanOptions, clean_record
from ochat.data.filter import filter_record
from ochat.data.fit import FitResult, Fitter, to_conversation
from ochat.data.sources import Bad, Limits, RawRecord, read_file
from ochat.data.tokenize import tokenize_records
from ochat.templates.conversation import Conversation, Message

ROW_SCHEMA = pa.schema([("id", pa.string()), ("group", pa.string()), ("condition", pa.string()),
                        ("tokens", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())),
                        ("text", pa.string())])  # `text`: the line of the text JSONL


@dataclass
class Outcome:
    """What became of one input item. `drop` = (step, reason, detail) ends it at that step."""
    where: str
    id: str = ""
    group: str = ""
    drop: tuple[str, str, str] | None = None
    fixes: tuple[str, ...] = ()                    # clean's repairs
    hash: str = ""
    record: dict | None = None                     # the cleaned (and labelled) record
    pieces: list[dict] = field(default_factory=list)  # after fit
    fit_drops: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    n_pieces: int = 0
    lines: list[str] = field(default_factory=list)  # canonical JSONL lines, when the run writes them
    rows: tuple[int, int] = (0, 0)                 # its rows in the batch's table
    cut: int = 0                                   # rows cut at the context


@dataclass
class StepConfig:
    steps: tuple[str, ...]
    clean: CleanOptions
    limits: Limits = Limits()
    models: list[str] = field(default_factory=lambda: ["any"])
    condition_map: dict[str, tuple[str, float]] | None = None
    fitter: Fitter | None = None
    lines: bool = False  # the run writes canonical JSONL (clean, filter, fit, split)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


class RecordSteps:
    def __init__(self, config: StepConfig):
        self.config = config

    def __call__(self, batch: list) -> tuple[list[Outcome], pa.Table | None, dict[str, float]]:
        """The outcomes, the tokenized rows, and the CPU seconds spent per step (for the report)."""
        t0 = time.process_time()
        outcomes = [o for item in batch for o in self._clean(item)]
        t1 = time.process_time()
        table = None
        live = [o for o in outcomes if o.drop is None]
        if "tokenize" in self.config.steps and live:
            table = self._fit_tokenize(live)
        elif "fit" in self.config.steps:
            for o in live:  # fit alone: only what might not fit (by its byte count) is tokenized
                self._guard(o, lambda o=o: self._fit_one(o))
        seconds = {"clean": t1 - t0}
        for step in ("tokenize", "fit"):  # fit and tokenize are one step in the workers: the last one gets it
            if step in self.config.steps:
                seconds[step] = time.process_time() - t1
                break
        for o in outcomes:  # send back only what the parent needs
            if o.drop is None and self.config.lines:
                o.lines = [json.dumps(r, ensure_ascii=False) for r in (o.pieces if "fit" in self.config.steps
                                                                        else [o.record])]
            o.n_pieces = len(o.pieces)
            o.record, o.pieces = None, []
        return outcomes, table, seconds

    @staticmethod
    def _guard(o: Outcome, fn) -> None:
        try:
            fn()
        except Exception as e:
            o.drop, o.pieces, o.fit_drops = ("fit", "error", _error(e)), [], []

    def _fit_one(self, o: Outcome) -> None:
        fit = self.config.fitter.fit(o.record)
        o.pieces, o.fit_drops, o.truncated = fit.pieces, fit.dropped, fit.truncated

    # -- read, clean, filter: one record at a time
    def _clean(self, item: Path | RawRecord | Bad) -> list[Outcome]:
        items = read_file(item, self.config.limits) if isinstance(item, Path) else [item]
        out = []
        for it in items:  # a page is read here, in the worker
            try:
                out.append(self._clean_one(it))
            except Exception as e:
                out.append(Outcome(getattr(it, "where", str(item)), getattr(it, "id", ""),
                                   drop=("clean", "error", _error(e))))
        return out

    def _clean_one(self, it: RawRecord | Bad) -> Outcome:
        if isinstance(it, Bad):
            return Outcome(it.where, drop=("read", it.reason, it.detail))
        res = clean_record(it, self.config.clean)
        o = Outcome(it.where, it.id, fixes=res.fixes, hash=res.hash)
        if res.record is None:
            o.drop = ("clean", res.reason, res.detail)
            return o
        rec = res.record
        o.group = rec["group"]
        if "filter" in self.config.steps:
            kept, reason, detail = filter_record(rec, self.config.models, self.config.condition_map)
            if kept is None:
                o.drop = ("filter", reason, f"model label {detail!r}" if detail else "")
                return o
            rec = kept
        o.record = rec
        return o

    # -- fit + tokenize: the whole batch at once (one tokenizer call for all its messages)
    def _fit_tokenize(self, live: list[Outcome]) -> pa.Table | None:
        try:
            return self._fit_tokenize_batch(live)
        except Exception:  # find the record that fails; the others go on
            tables = []
            for o in live:
                try:
                    t = self._fit_tokenize_batch([o])
                except Exception as e:
                    o.drop, o.pieces, o.fit_drops = ("tokenize", "error", _error(e)), [], []
                    continue
                if t is not None:
                    start = sum(len(x) for x in tables)
                    o.rows = (o.rows[0] + start, o.rows[1] + start)
                    tables.append(t)
            return pa.concat_tables(tables) if tables else None

    def _fit_tokenize_batch(self, live: list[Outcome]) -> pa.Table | None:
        fitter = self.config.fitter
        parts = MessageTokens(fitter.encoder, [o.record for o in live])
        for o in live:
            rec = o.record
            fit = FitResult(pieces=[rec]) if parts.length(rec) <= fitter.max_context else \
                fitter.fit(rec, parts.lengths(rec))
            o.pieces, o.fit_drops, o.truncated = fit.pieces, fit.dropped, fit.truncated
        pieces = [p for o in live for p in o.pieces]
        if not pieces:
            return None
        encoded = [parts.assemble(p) for p in pieces]
        again = [i for i, e in enumerate(encoded) if e is None]  # a truncated answer: its text changed
        if again:
            for i, t, w in zip(again, *fitter.encoder.encode([to_conversation(pieces[i]) for i in again])):
                encoded[i] = (t, w)
        k = 0
        for o in live:
            o.rows = (k, k + len(o.pieces))
            o.cut = sum(_past_context(p, encoded[i][0], fitter) for i, p in enumerate(o.pieces, k))
            k += len(o.pieces)
        rows, _ = tokenize_records(fitter.encoder, pieces, fitter.max_context,
                                   encoded=([t for t, _ in encoded], [w for _, w in encoded]))
        return rows_table(rows)


class MessageTokens:
    """The token ids of every message of a batch of records, from one tokenizer call.

    The encoder concatenates separately tokenized pieces, so a conversation's ids are its "base"
    (BOS, system prompt) followed by each message's ids (prefix, content, end-of-turn): every record
    and every piece that `fit` cuts out of one is assembled from these, never tokenized again."""

    def __init__(self, encoder, records: list[dict]):
        convs, self.index = [], {}
        for r in records:
            system, cond = r.get("system") or "", r.get("condition") or ""
            self.index[id(r)] = len(convs)
            convs.append(Conversation(items=[], system=system, condition=cond))
            convs += [Conversation(items=[Message(role=m["role"], content=m["content"], weight=m.get("weight"))],
                                   system=system, condition=cond) for m in r["items"]]
        self.tokens, self.weights = encoder.encode(convs)
        # message -> (its record's base, its own conversation)
        self.messages = {id(m): (self.index[id(r)], self.index[id(r)] + 1 + j)
                         for r in records for j, m in enumerate(r["items"])}

    def lengths(self, record: dict) -> tuple[int, list[int]]:
        base = len(self.tokens[self.index[id(record)]])
        return base, [len(self.tokens[self.messages[id(m)][1]]) - base for m in record["items"]]

    def length(self, record: dict) -> int:
        base, lens = self.lengths(record)
        return base + sum(lens)

    def assemble(self, piece: dict) -> tuple[list[int], list[float]] | None:
        """The ids and weights of a record or piece, or None if one of its messages is new (cut)."""
        ks = [self.messages.get(id(m)) for m in piece["items"]]
        if not ks or None in ks:
            return None
        b = ks[0][0]
        n = len(self.tokens[b])
        tokens, weights = list(self.tokens[b]), list(self.weights[b])
        for _, j in ks:
            tokens += self.tokens[j][n:]
            weights += self.weights[j][n:]
        return tokens, weights


def _past_context(piece: dict, tokens: list[int], fitter: Fitter) -> bool:
    """Whether `tokenize_records` cut this piece at the context (after leaving out a truncated end-of-turn)."""
    n = len(tokens) - (1 if piece.get("truncated") and tokens and tokens[-1] == fitter.encoder.eot_id else 0)
    return n > fitter.max_context


def rows_table(rows: list) -> pa.Table:
    """Tokenized rows -> one Arrow table (Arrow converts the token lists in C++)."""
    text = [json.dumps({"id": r.id, "text": r.text, "conversation": r.conversation, "model": r.model},
                       ensure_ascii=False) for r in rows]
    return pa.table({"id": [r.id for r in rows], "group": [r.group for r in rows],
                     "condition": [r.condition for r in rows],
                     "tokens": pa.array([r.tokens for r in rows], pa.list_(pa.int32())),
                     "weights": pa.array([r.weights for r in rows], pa.list_(pa.float32())), "text": text},
                    schema=ROW_SCHEMA)
