"""Read conversations from ShareGPT pages, ShareGPT JSON dumps and ochat JSONL, streaming.

Every reader yields `RawRecord`s (one conversation, not yet cleaned) or `Bad`s (something that
could not be read: the file, the line or index, and the reason). Nothing is ever written to an
input file, and a malformed file never stops the run.

Kinds, detected per file from the extension and then the first non-blank byte:
- `sharegpt_page`: `.html` saved from sharegpt.com, a Next.js page whose
  `<script id="__NEXT_DATA__">` JSON holds `props.pageProps.content.items` ({"from", "value": HTML}).
- `sharegpt_json`: `[{"id", "conversations": [{"from", "value"}], "model"?}, ...]` (read item by item).
- `ochat_jsonl`: one canonical conversation per line (`items` with role/content/weight, or ShareGPT).
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

_NEXT_DATA = re.compile(r'<script[^>]*\bid=["\']__NEXT_DATA__["\'][^>]*>', re.I)


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


def expand_inputs(inputs: Iterable[str | os.PathLike], exclude: Iterable[Path] = ()) -> tuple[list[Path], list[Bad]]:
    """Files to read, in a stable order: a folder contributes its files (recursively, sorted by path),
    except hidden ones and the `exclude`d files (this run's outputs, when they lie inside an input folder)."""
    files: list[Path] = []
    bad: list[Bad] = []
    excluded = {p.resolve() for p in exclude}
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*")
                            if q.is_file() and not any(x.startswith(".") for x in q.relative_to(p).parts)):
                if f.resolve() in excluded:
                    continue
                if f.suffix.lower() in KNOWN_EXTS:
                    files.append(f)
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


def read_inputs(inputs: Iterable[str | os.PathLike], exclude: Iterable[Path] = (),
                defer_pages: bool = False) -> Iterator[Item | Path]:
    """Every record of every input. With `defer_pages`, a ShareGPT page is yielded as its Path,
    so that a worker process reads and parses it (pages are one file per conversation)."""
    files, bad = expand_inputs(inputs, exclude)
    yield from bad
    for path in files:
        if defer_pages and path.suffix.lower() in PAGE_EXTS:
            yield path
        else:
            yield from read_file(path)


def read_file(path: Path) -> Iterator[Item]:
    where = str(path)
    try:
        kind = detect_kind(path)
    except OSError as e:
        yield Bad(where, "unreadable_file", str(e))
        return
    if kind is None:
        yield Bad(where, "empty_file")
        return
    try:
        if kind == "sharegpt_page":
            yield _read_page(path)
        elif kind == "sharegpt_json":
            yield from _read_json(path)
        elif kind == "ochat_jsonl":
            yield from _read_jsonl(path)
        else:
            yield Bad(where, "unknown_format", "expected a ShareGPT page (.html), a JSON dump or JSONL")
    except OSError as e:
        yield Bad(where, "unreadable_file", str(e))


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
    try:
        data = json.loads(html[m.end():end])
    except json.JSONDecodeError as e:
        return Bad(where, "truncated_html", f"__NEXT_DATA__ is not valid JSON ({e.msg} at char {e.pos})")
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
    return RawRecord(where=where, kind="sharegpt_page", id=str(props.get("id") or Path(where).stem),
                     messages=[(it.get("from"), it.get("value")) for it in items],
                     model=str(model) if model else None,
                     extra={"views": props.get("views"), "title": content.get("title")})


def _read_page(path: Path) -> Item:
    text = _decode(path.read_bytes(), str(path))
    return text if isinstance(text, Bad) else parse_page(text, str(path))


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
    model = obj.get("model")
    return RawRecord(where=where, kind=kind, id=str(obj.get("id") or default_id), messages=messages,
                     model=str(model) if model else None, system=system, condition=condition,
                     weights=weights if any(w is not None for w in weights) else None,
                     extra={k: obj[k] for k in ("group", "source", "truncated") if obj.get(k) is not None})


def iter_json_array(f, chunk_size: int = 1 << 20) -> Iterator[tuple[int, Any] | tuple[int, Exception]]:
    """Stream the elements of a top-level JSON array (or a single object) from a binary file.

    Yields (index, value); on a decode error yields (index, exception) and stops."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    dec = json.JSONDecoder()
    buf = ""
    eof = False
    index = 0
    started = False

    def fill() -> bool:
        nonlocal buf, eof
        if eof:
            return False
        chunk = f.read(chunk_size)
        if not chunk:
            eof = True
            buf += decoder.decode(b"", final=True)
            return False
        buf += decoder.decode(chunk)
        return True

    try:
        pos = 0
        while True:
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or not fill():
                    break
            if pos >= len(buf):
                if started:
                    yield index, ValueError("the array is not closed (truncated file?)")
                return
            if not started:
                started = True
                if buf[pos] == "{":  # a single conversation object
                    while True:
                        try:
                            obj, pos = dec.raw_decode(buf, pos)
                            yield 0, obj
                            return
                        except json.JSONDecodeError as e:
                            if not fill():
                                yield 0, e
                                return
                if buf[pos] != "[":
                    yield 0, ValueError(f"expected a JSON array, found {buf[pos]!r}")
                    return
                pos += 1
                continue
            if buf[pos] == "]":
                return
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # maybe the element continues in the next chunk
                    if not fill():
                        yield index, e
                        return
            yield index, obj
            index += 1
            pos = end
            if pos > chunk_size:  # keep the buffer small
                buf = buf[pos:]
                pos = 0
    except UnicodeDecodeError as e:
        yield index, e


def _read_json(path: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for index, obj in iter_json_array(f):
            where = f"{path}[#{index}]"
            if isinstance(obj, UnicodeDecodeError):
                yield Bad(where, "not_utf8", "invalid UTF-8; the rest of the file is skipped")
            elif isinstance(obj, Exception):
                msg = obj.msg if isinstance(obj, json.JSONDecodeError) else str(obj)
                yield Bad(where, "invalid_json", f"{msg}; the rest of the file is skipped")
            else:
                yield _record_from_obj(obj, where, "sharegpt_json", f"{path.stem}_{index}")


# -- ochat JSONL ------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield Bad(where, "not_utf8", f"invalid UTF-8 at byte {e.start} of the line")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Bad(where, "invalid_json", e.msg)
                continue
            yield _record_from_obj(obj, where, "ochat_jsonl", f"{path.stem}_{lineno}")
