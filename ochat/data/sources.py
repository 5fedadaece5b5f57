"""Read conversations from ShareGPT pages, ShareGPT JSON dumps and ochat JSONL, streaming.

Every reader yields `RawRecord`s (one conversation, not yet cleaned) or `Bad`s (something that
could not be read: the file, the line or index, and the reason). Nothing is ever written to an
input file, and a malformed file never stops the run.

Kinds, detected per file from the extension and then the first non-blank byte:
- `sharegpt_page`: `.html` saved from sharegpt.com, a Next.js page whose
  `<script id="__NEXT_DATA__">` JSON holds `props.pageProps.content.items` ({"from", "value": HTML}).
- `sharegpt_json`: `[{"id", "conversations": [{"from", "value"}], "model"?}, ...]` (read item by item).
- `ochat_jsonl`: one canonical conversation per line (`items` with role/content/weight, or ShareGPT).

Work is bounded on any input: a page, JSON element or JSONL line larger than `Limits.max_record_bytes`
is skipped without being parsed (nor held in memory), JSON nested deeper than `Limits.max_depth` is
skipped, and every scan is linear (a large element is never re-parsed as more of it arrives).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

PAGE_EXTS = {".html", ".htm"}
JSON_EXTS = {".json"}
JSONL_EXTS = {".jsonl", ".ndjson"}
KNOWN_EXTS = PAGE_EXTS | JSON_EXTS | JSONL_EXTS

# bounded repeats: linear even on a page of "<script" without a closing ">"
_NEXT_DATA = re.compile(r'<script\b[^<>]{0,500}?\bid=["\']__NEXT_DATA__["\'][^<>]{0,500}>', re.I)
MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one record may weigh; anything larger is dropped and counted, never parsed."""
    max_record_bytes: int = 16 * MB     # a page file, a JSON dump element, a JSONL line
    max_message_chars: int = 1_000_000  # one message's text (checked by the clean step)
    max_depth: int = 64                 # JSON nesting (a conversation needs 4)


@dataclass
class RawRecord:
    """One conversation as found in the input. `messages` are (raw role, raw value) pairs."""
    where: str                      # file, file:line or file[#index]
    kind: str
    id: str
    messages: list[tuple[Any, Any]]
    model: str | None = None        # the source's model label, e.g. "Model: GPT-4"
    system: str = ""
    condition: str = ""
    weights: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bad:
    where: str
    reason: str
    detail: str = ""


Item = Union[RawRecord, Bad]


def _folder_files(folder: Path) -> Iterator[Path]:
    """Regular files under `folder` with a known extension, hidden ones left out; one listing per
    directory (`scandir` knows each entry's type without a stat), no symlinked directory followed."""
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _folder_files(Path(entry.path))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in KNOWN_EXTS:
                yield Path(entry.path)


def expand_inputs(inputs: Iterable[str | os.PathLike], exclude: Iterable[Path] = ()) -> tuple[list[Path], list[Bad]]:
    """Files to read, in a stable order: a folder contributes its files (recursively, sorted by path),
    except hidden ones and the `exclude`d files (this run's outputs, when they lie inside an input folder)."""
    files: list[Path] = []
    bad: list[Bad] = []
    excluded = {p.resolve() for p in exclude}
    excluded_names = {p.name for p in excluded}
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files += sorted((f for f in _folder_files(p) if f.name not in excluded_names or f.resolve() not in excluded),
                            key=lambda f: f.parts)
        elif p.is_file():
            files.append(p)
        else:
            bad.append(Bad(str(p), "missing_input", "no such file or directory"))
    return files, bad


def detect_kind(path: Path) -> str | None:
    """The kind of a file; None if it is empty (only whitespace)."""
    ext = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        while not head:
            chunk = f.read(65536)
            if not chunk:
                return None
            head = chunk.lstrip()
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:].lstrip()
    if ext in PAGE_EXTS:
        return "sharegpt_page"
    if ext in JSONL_EXTS:
        return "ochat_jsonl"
    if head[:1] == b"<":
        return "sharegpt_page"
    if head[:1] == b"[":
        return "sharegpt_json"
    if head[:1] == b"{":
        # One JSON object per line, or a single conversation spread over many lines.
        first_line = head.split(b"\n", 1)[0].strip()
        if ext in JSON_EXTS and not first_line.endswith(b"}"):
            return "sharegpt_json"
        return "ochat_jsonl"
    return "ochat_jsonl" if ext in JSONL_EXTS else "sharegpt_json" if ext in JSON_EXTS else "unknown"


def read_inputs(inputs: Iterable[str | os.PathLike], exclude: Iterable[Path] = (), defer_pages: bool = False,
                limits: Limits = Limits()) -> Iterator[Item | Path]:
    """Every record of every input. With `defer_pages`, a ShareGPT page is yielded as its Path,
    so that a worker process reads and parses it (pages are one file per conversation)."""
    files, bad = expand_inputs(inputs, exclude)
    yield from bad
    for path in files:
        if defer_pages and path.suffix.lower() in PAGE_EXTS:
            yield path
        else:
            yield from read_file(path, limits)


def read_file(path: Path, limits: Limits = Limits()) -> Iterator[Item]:
    """The records of one file; whatever goes wrong becomes a `Bad`, never an exception."""
    where = str(path)
    try:
        kind = detect_kind(path)
    except OSError as e:
        yield Bad(where, "unreadable_file", str(e))
        return
    if kind is None:
        yield Bad(where, "empty_file")
        return
    readers = {"sharegpt_page": lambda: iter([_read_page(path, limits)]),
               "sharegpt_json": lambda: _read_json(path, limits), "ochat_jsonl": lambda: _read_jsonl(path, limits)}
    if kind not in readers:
        yield Bad(where, "unknown_format", "expected a ShareGPT page (.html), a JSON dump or JSONL")
        return
    n = 0
    try:
        for item in readers[kind]():
            n += 1
            yield item
    except OSError as e:
        yield Bad(where, "unreadable_file", str(e))
    except Exception as e:  # a reader bug must not stop the run: the rest of this file is counted as lost
        yield Bad(where, "unreadable_file", f"after {n} records: {type(e).__name__}: {e}"[:300])


def _loads(text: str, where: str) -> Any:
    """json.loads, or a Bad: invalid JSON, an integer of thousands of digits, nesting past the recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return Bad(where, "invalid_json", f"{e.msg} at char {e.pos}")
    except RecursionError:
        return Bad(where, "too_deep", "JSON nested deeper than Python's recursion limit")
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return Bad(where, "invalid_json", str(e)[:200])


# -- ShareGPT pages ---------------------------------------------------------------------------------

def _decode(data: bytes, where: str) -> str | Bad:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Bad(where, "not_utf8", f"invalid UTF-8 at byte {e.start}")


def parse_page(html: str, where: str) -> RawRecord | Bad:
    m = _NEXT_DATA.search(html)
    if not m:
        if "__NEXT_DATA__" in html:
            return Bad(where, "truncated_html", "the __NEXT_DATA__ script tag is cut off")
        return Bad(where, "no_next_data", "no <script id=\"__NEXT_DATA__\"> in the page")
    end = html.find("</script>", m.end())
    if end < 0:
        return Bad(where, "truncated_html", "the __NEXT_DATA__ script is not closed")
    data = _loads(html[m.end():end], where)
    if isinstance(data, Bad):
        if data.reason == "invalid_json":
            data.reason, data.detail = "truncated_html", f"__NEXT_DATA__ is not valid JSON ({data.detail})"
        return data
    props = data.get("props") if isinstance(data, dict) else None
    props = props.get("pageProps") if isinstance(props, dict) else None
    if not isinstance(props, dict):
        return Bad(where, "bad_field", "__NEXT_DATA__ has no props.pageProps object")
    content = props.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("items"), list):
        return Bad(where, "bad_field", "props.pageProps.content.items: expected a list of messages")
    items = content["items"]
    if not all(isinstance(it, dict) for it in items):
        return Bad(where, "bad_field", "props.pageProps.content.items: expected objects {from, value}")
    model = content.get("model") or props.get("model")
    return RawRecord(where=where, kind="sharegpt_page", id=_text(props.get("id")) or Path(where).stem,
                     messages=[(it.get("from"), it.get("value")) for it in items],
                     model=_text(model) or None, extra={"views": props.get("views"), "title": content.get("title")})


def _text(value: Any) -> str:
    """An id or a label as text (a number becomes its digits); anything else is not one."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def _read_page(path: Path, limits: Limits) -> Item:
    where = str(path)
    size = path.stat().st_size
    if size > limits.max_record_bytes:  # never read
        return Bad(where, "too_large", f"{size} bytes, more than --max-record-mb {limits.max_record_bytes / MB:g}")
    with open(path, "rb") as f:
        data = f.read(limits.max_record_bytes + 1)  # the file may have grown since stat()
    if len(data) > limits.max_record_bytes:
        return Bad(where, "too_large", f"more than --max-record-mb {limits.max_record_bytes / MB:g}")
    text = _decode(data, where)
    return text if isinstance(text, Bad) else parse_page(text, where)


# -- ShareGPT JSON dumps (streamed item by item) ----------------------------------------------------

def _record_from_obj(obj: Any, where: str, kind: str, default_id: str) -> Item:
    if not isinstance(obj, dict):
        return Bad(where, "bad_field", f"expected a conversation object, got {type(obj).__name__}")
    msgs = obj.get("items", obj.get("conversations", obj.get("messages")))
    if not isinstance(msgs, list):
        return Bad(where, "bad_field", "expected 'items' or 'conversations': a list of messages")
    messages: list[tuple[Any, Any]] = []
    weights: list[Any] = []
    for m in msgs:
        if not isinstance(m, dict):
            return Bad(where, "bad_field", "a message is not an object")
        if "role" in m:
            messages.append((m.get("role"), m.get("content")))
        else:
            messages.append((m.get("from"), m.get("value")))
        weights.append(m.get("weight"))
    system = obj.get("system") or ""
    condition = obj.get("condition") or ""
    if not isinstance(system, str) or not isinstance(condition, str):
        return Bad(where, "bad_field", "'system' and 'condition' must be strings")
    return RawRecord(where=where, kind=kind, id=_text(obj.get("id")) or default_id, messages=messages,
                     model=_text(obj.get("model")) or None, system=system, condition=condition,
                     weights=weights if any(w is not None for w in weights) else None,
                     extra={k: obj[k] for k in ("group", "source", "truncated") if obj.get(k) is not None})


_STRUCT = re.compile(r'["\[\]{}]')
_STR_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)  # a string's content up to its closing quote
_SCALAR_END = re.compile(r"[,\]}\s]")
_SKIP = " \t\r\n,"
_DECODER = json.JSONDecoder()


class _ArrayReader:
    """The elements of a top-level JSON array (or one object) of a binary file.

    An element that fits in the buffer is decoded by `raw_decode` at C speed. Otherwise its end is
    found by a scanner that keeps its state across reads (a string is skipped by one regex), so every
    byte is looked at a bounded number of times; an element past `max_record_bytes` or `max_depth`
    is read past without being kept or parsed."""

    def __init__(self, f, limits: Limits, chunk_size: int = MB):
        self.f, self.limits, self.chunk_size = f, limits, chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        self.buf, self.pos, self.eof = "", 0, False

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(self.chunk_size)
        if not chunk:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        if self.pos > self.chunk_size:  # drop what was read: the buffer stays about one chunk
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += self.decoder.decode(chunk)
        return True

    def skip_blank(self) -> bool:
        """Move past whitespace and commas; False at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SKIP:
                self.pos += 1
            if self.pos < len(self.buf):
                return True
            if not self.fill():
                return False

    def element(self) -> tuple[str | None, str]:
        """(the element's JSON text, or None when it is skipped, and why: "too_large", "too_deep", "eof")."""
        start = self.pos
        try:
            _, end = _DECODER.raw_decode(self.buf, start)
            # a container or a string ends where it ends; a number may go on in the next read
            if self.buf[start] in '[{"' or self.eof or (end < len(self.buf) and self.buf[end] in ",]} \t\r\n"):
                self.pos = end
                return self.buf[start:end], ""
        except (json.JSONDecodeError, RecursionError, ValueError):
            pass  # cut by the buffer end, too deep, or invalid: find its end, then decide
        return self.scan()

    def scan(self) -> tuple[str | None, str]:
        kept: list[str] = []  # the element's text so far, while within the limits
        size, depth, why = 0, 0, ""
        pos = self.pos
        in_string, scalar = self.buf[pos] == '"', self.buf[pos] not in '[{"'
        if in_string:
            pos += 1
            kept.append('"')
        while True:
            buf = self.buf
            if in_string:
                end = _STR_BODY.match(buf, pos).end()
                closed = end < len(buf) and buf[end] == '"'
                upto, done = (end + 1, depth == 0) if closed else (end, False)
                in_string = not closed
            elif scalar:  # a number, true, null... or a stray character: at least one is consumed
                m = _SCALAR_END.search(buf, pos + (size == 0))
                upto, done = (m.start(), True) if m else (len(buf), False)
            else:
                m = _STRUCT.search(buf, pos)
                upto, done = (m.end() if m else len(buf)), False
                if m and m.group(0) == '"':
                    in_string = True
                elif m:
                    depth += 1 if m.group(0) in "[{" else -1
                    done = depth <= 0
                    if depth > self.limits.max_depth:
                        why = why or "too_deep"
            size += upto - pos
            if size > self.limits.max_record_bytes:
                why = why or "too_large"
            if not why:
                kept.append(buf[pos:upto])
            pos = upto
            if done:
                self.pos = pos
                return (None, why) if why else ("".join(kept), "")
            if pos >= len(buf) or (in_string and pos == len(buf) - 1 and buf[pos] == "\\"):
                self.pos = pos
                if not self.fill():
                    self.pos = len(self.buf)
                    return None, "eof"
                pos = self.pos


def iter_json_array(f, chunk_size: int = MB, limits: Limits = Limits()
                    ) -> Iterator[tuple[int, Any] | tuple[int, Exception]]:
    """Stream the elements of a top-level JSON array (or a single object) from a binary file.

    Yields (index, value) or (index, Bad) for an element that is invalid, too large or too deep;
    (index, exception) ends the stream (the file is cut, not UTF-8, or not an array)."""
    r = _ArrayReader(f, limits, chunk_size)
    try:
        if not r.skip_blank():
            return
        single = r.buf[r.pos] == "{"
        if not single:
            if r.buf[r.pos] != "[":
                yield 0, ValueError(f"expected a JSON array, found {r.buf[r.pos]!r}")
                return
            r.pos += 1
        index = 0
        while True:
            if not r.skip_blank():
                if not single:
                    yield index, ValueError("the array is not closed (truncated file?)")
                return
            if not single and r.buf[r.pos] == "]":
                return
            text, why = r.element()
            if why == "eof":
                yield index, ValueError("the file ends inside this element (truncated file?)")
                return
            if why:
                yield index, Bad("", why, f"more than --max-record-mb {limits.max_record_bytes / MB:g}"
                                 if why == "too_large" else f"JSON nested deeper than {limits.max_depth}")
            else:
                yield index, _loads(text, "")
            index += 1
            if single:
                return
    except UnicodeDecodeError as e:
        yield 0, e


def _read_json(path: Path, limits: Limits) -> Iterator[Item]:
    with open(path, "rb") as f:
        for index, obj in iter_json_array(f, limits=limits):
            where = f"{path}[#{index}]"
            if isinstance(obj, Bad):
                yield Bad(where, obj.reason, obj.detail)
            elif isinstance(obj, UnicodeDecodeError):
                yield Bad(where, "not_utf8", "invalid UTF-8; the rest of the file is skipped")
            elif isinstance(obj, Exception):
                yield Bad(where, "invalid_json", f"{obj}; the rest of the file is skipped")
            else:
                yield _record_from_obj(obj, where, "sharegpt_json", f"{path.stem}_{index}")


# -- ochat JSONL ------------------------------------------------------------------------------------

def _lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file; None for a line longer than `limit`, which is read past, not kept."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MB)
            yield None
        else:
            yield raw


def _read_jsonl(path: Path, limits: Limits) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, limits.max_record_bytes), 1):
            where = f"{path}:{lineno}"
            if raw is None:
                yield Bad(where, "too_large", f"a line of more than --max-record-mb {limits.max_record_bytes / MB:g}")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield Bad(where, "not_utf8", f"invalid UTF-8 at byte {e.start} of the line")
                continue
            obj = _loads(line, where)
            yield obj if isinstance(obj, Bad) else _record_from_obj(obj, where, "ochat_jsonl", f"{path.stem}_{lineno}")
