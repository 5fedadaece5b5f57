"""Clean one conversation: ChatGPT HTML -> Markdown, page artefacts, format checks, blocked words.

The result is a *record*: the canonical conversation plus where it came from,

    {"id", "group", "model", "source", "system", "condition",
     "items": [{"role": "user"|"assistant", "content": str, "weight": float|None}]}

which is what every intermediate `ochat data ...` JSONL file holds (one per line). Exact
duplicates are found by `record_hash`: sha256 of the normalised text (stable across runs and
machines, unlike Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
import html as htmllib
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from html_to_markdown import _html_to_markdown as h2m  # the compiled core, typed in its .pyi

from ochat.data.sources import RawRecord
from ochat.templates.conversation import SHAREGPT_ROLES

DEFAULT_BLOCKED_WORDS = ("openai",)

# A message is HTML if it starts with a tag ChatGPT's renderer emits; human turns are plain text
# (and may contain "<div>" as code a user pasted, which must stay as is).
_HTML_START = re.compile(r"^\s*<(?:p|div|pre|ol|ul|table|h[1-6]|blockquote|span|code|br|hr|em|strong|a|img)\b",
                         re.I)
# Every pattern below is linear in its input: bounded repeats, no `.*?` that an unclosed tag would
# make rescan to the end once per opening tag.
_PRE_OPEN = re.compile(r"<pre\b[^<>]{0,500}>", re.I)
_CODE_OPEN = re.compile(r"<code\b([^<>]{0,500})>", re.I)
_LANG_CLASS = re.compile(r"\blanguage-([\w+#.-]+)")
_HEADER_LANG = re.compile(r"<span\b[^<>]{0,200}>\s{0,20}([\w+#. -]{1,40}?)\s{0,20}</span>\s{0,20}<button\b", re.I)
_TAG = re.compile(r"<[^<>]*>")
_PLACEHOLDER = re.compile(r"^([ \t]*(?:(?:[-*+]|\d+\.)[ \t]+)?)ochatcodeblock(\d+)z[ \t]*$", re.M)
# A blank line before a list item that continues a list (html-to-markdown separates the items of a
# "loose" list, <li><p>, by blank lines; ChatGPT's answers are read as tight lists, one item a line).
_LIST_GAP = re.compile(r"^(?:([ \t]*)([-*+]|\d+[.)])[ \t].*|([ \t]+)\S.*)\n\n(?=([ \t]*)([-*+]|\d+[.)])[ \t])", re.M)
# html-to-markdown numbers a list that follows another one "1)"; ChatGPT writes "1."
_PAREN_ITEM = re.compile(r"^([ \t]*\d+)\)([ \t])", re.M)
# ... and escapes text that would read as Markdown at a line start; the text is kept as written
_LINE_START_ESCAPE = re.compile(r"^([ \t]*(?:\d+)?)\\([#>+\-.)])", re.M)

# ChatGPT page artefacts (the patterns of FastChat's clean_sharegpt.py, applied after conversion)
_REGENERATE = re.compile(r"^\s*\d+ / \d+")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_FLAT_CODE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*(?:Copy code)+(.+?)\s*?```", re.S)
_EMPTY_COPY_CODE = re.compile(r"```[^\n`]*?Copy code\s*```")
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})", re.M)
_BLANKS = re.compile(r"\n{3,}")
_SURROGATE = re.compile("[\ud800-\udfff]")

# html-to-markdown (Rust): ATX headings, "-" bullets, GFM tables, nothing escaped (code and
# identifiers keep their underscores and asterisks); the "Copy code" button and its icon dropped.
# Built once as the native options object: the Python wrapper would rebuild it on every call.
_MD_OPTIONS = h2m.ConversionOptions(heading_style=h2m.HeadingStyle.ATX, bullets="-", escape_asterisks=False, escape_underscores=False,
                                escape_misc=False, autolinks=True, compact_tables=True, extract_metadata=False,
                                exclude_selectors=["button", "svg"])


def _code_language(code_attrs: str, pre_html: str) -> str:
    m = _LANG_CLASS.search(code_attrs)
    if m:
        return m.group(1)
    m = _HEADER_LANG.search(pre_html)
    return m.group(1).strip() if m else ""


def _fence(lang: str, body: str) -> str:
    body = body.rstrip("\n")
    longest = max((len(m) for m in re.findall(r"`{3,}", body)), default=2)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{body}\n{ticks}"


def _strip_element(html: str, lower: str, name: str) -> str:
    """`html` without its `<name ...>...</name>` elements (first closing tag wins), in one pass."""
    out, pos, open_tag, close_tag = [], 0, f"<{name}", f"</{name}"
    while True:
        i = lower.find(open_tag, pos)
        if i < 0:
            break
        j = lower.find(close_tag, i)
        k = lower.find(">", j) if j >= 0 else -1
        if k < 0:  # never closed: nothing after it is text
            out.append(html[pos:i])
            return "".join(out)
        out.append(html[pos:i])
        pos = k + 1
    out.append(html[pos:])
    return "".join(out)


def _pre_to_fence(inner: str) -> str:
    """A ChatGPT `<pre>`: header (language, "Copy code" button) + `<code>` with highlight spans."""
    lower = inner.lower()
    m = _CODE_OPEN.search(inner)
    end = lower.rfind("</code") if m else -1
    if m and end >= m.end():
        lang = _code_language(m.group(1), inner[:m.start()][-2000:])
        body = inner[m.end():end]
    else:
        lang = _code_language("", inner[:2000])
        body = _strip_element(inner, lower, "button")
    # Tags are only highlight spans here; the text (indentation, underscores) is kept verbatim.
    return _fence(lang, htmllib.unescape(_TAG.sub("", body)))


def _stash_code_blocks(value: str, blocks: list[str]) -> str:
    """Every `<pre>...</pre>` -> a placeholder paragraph, its fenced code appended to `blocks`.
    One left-to-right pass: each search starts where the previous one ended."""
    lower = value.lower()
    out, pos = [], 0
    while True:
        m = _PRE_OPEN.search(value, pos)
        if not m:
            break
        close = lower.find("</pre", m.end())
        close_end = lower.find(">", close) if close >= 0 else -1
        if close_end < 0:  # an unclosed <pre>: the rest of the message is its code
            close = close_end = len(value)
        out.append(value[pos:m.start()])
        blocks.append(_pre_to_fence(value[m.end():close]))
        out.append(f"<p>ochatcodeblock{len(blocks) - 1}z</p>")
        pos = close_end + 1
    out.append(value[pos:])
    return "".join(out)


def _kind(marker: str) -> str:
    return marker[-1] if marker[-1] in ".)" else "-"


def _tight_list_gap(m: re.Match) -> str:
    item_indent, marker, text_indent, next_indent, next_marker = m.groups()
    if next_marker[:-1] == "1":  # "1." / "1)" starts another list: the blank line separates them
        return m.group(0)
    if item_indent is not None:  # after an item line: a sibling (same kind of list) or a shallower item
        keep = len(next_indent) > len(item_indent) or (
            len(next_indent) == len(item_indent) and _kind(marker) != _kind(next_marker))
    else:  # after an item's indented paragraph: only a shallower item follows tightly
        keep = len(next_indent) >= len(text_indent)
    return m.group(0) if keep else m.group(0)[:-1]


def html_to_markdown(value: str) -> str:
    """ChatGPT's rendered HTML -> Markdown with code blocks (language, indentation), lists, tables, links."""
    blocks: list[str] = []
    value = _stash_code_blocks(value, blocks)
    for name in ("button", "svg"):  # as text: html-to-markdown's exclusion also eats the space before it
        if f"<{name}" in value:
            value = _strip_element(value, value.lower(), name)
    md = h2m.convert(value, _MD_OPTIONS).content.strip()
    if "\n\n" in md:
        md = _LIST_GAP.sub(_tight_list_gap, md)
    if "\\" in md or ")" in md:
        md = _LINE_START_ESCAPE.sub(r"\1\2", _PAREN_ITEM.sub(r"\1.\2", md))

    def unstash(m: re.Match) -> str:
        lead = m.group(1)
        indent = " " * len(lead)
        lines = blocks[int(m.group(2))].split("\n")
        # a code block inside a list item is indented like the item's text
        return "\n".join([lead + lines[0]] + [(indent + line) if line else line for line in lines[1:]])

    return _PLACEHOLDER.sub(unstash, md) if blocks else md


def _collapse_blank_lines(text: str) -> str:
    """At most one blank line between paragraphs, but never touch the inside of a code block."""
    out: list[str] = []
    parts = re.split(r"(^[ \t]*(?:`{3,}|~{3,}).*$)", text, flags=re.M)
    inside = False
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a fence line
            out.append(part)
            inside = not inside
        else:
            out.append(part if inside else _BLANKS.sub("\n\n", part))
    return "".join(out)


def remove_artefacts(text: str) -> str:
    """Remove ChatGPT page artefacts: "N / M" regenerate counter, "CopyN chars / M words", "Copy code"."""
    m = _REGENERATE.match(text)
    if m:
        text = text[m.end():]
    if "Copy" in text:  # each pattern needs it: skip three passes over most answers
        text = _COPY_CHARS.sub("", text)
        text = _EMPTY_COPY_CODE.sub("", text)
        text = _FLAT_CODE.sub(lambda m: f"```{m.group(1)}\n{m.group(2).strip(chr(10))}\n```", text)
    return (_collapse_blank_lines(text) if "\n\n\n" in text else text).strip()


def clean_text(value: str, kind: str, role: str = "assistant") -> str:
    """ChatGPT's answers are rendered HTML; user turns (and canonical JSONL) are plain text/Markdown
    and are kept as typed: a user pasting `<div>...</div>` asks about that HTML."""
    if kind == "ochat_jsonl" or role != "assistant":
        return value.strip()
    m = _REGENERATE.match(value)
    if m:
        value = value[m.end():]
    if "<" in value and _HTML_START.match(value):
        value = html_to_markdown(value)
    return remove_artefacts(value)


def normalise_for_hash(text: str) -> str:
    """NFC, whitespace runs as one space (str.split's whitespace is the regex `\\s`'s), stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def record_hash(record: dict) -> str:
    h = hashlib.sha256()
    h.update(normalise_for_hash(record.get("system", "")).encode("utf-8"))
    for m in record["items"]:
        h.update(b"\x1e" + m["role"].encode() + b"\x1f" + normalise_for_hash(m["content"]).encode("utf-8"))
    return h.hexdigest()


@dataclass
class CleanOptions:
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS
    max_message_chars: int = 1_000_000  # a longer message drops its conversation, unconverted
    _blocked: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        words = [w.strip() for w in self.blocked_words if w and w.strip()]
        self.blocked_words = tuple(words)
        self._blocked = re.compile("|".join(re.escape(w) for w in words), re.I) if words else None


@dataclass
class CleanResult:
    record: dict | None
    reason: str = ""          # why it was dropped
    detail: str = ""
    fixes: tuple[str, ...] = ()  # repairs made (a dropped leading assistant / trailing user turn)
    hash: str = ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(i: int, role: Any, value: Any, weight: Any, kind: str, options: CleanOptions) -> dict | CleanResult:
    """One message as {"role", "content", "weight"}, or why its conversation is dropped."""
    mapped = SHAREGPT_ROLES.get(role.lower()) if isinstance(role, str) else None
    if mapped is None:
        return CleanResult(None, "unknown_role", f"message {i}: role {_short(role)}")
    if value is None:
        value = ""
    if not isinstance(value, str):
        return CleanResult(None, "bad_field", f"message {i}: content is {type(value).__name__}, expected text")
    if len(value) > options.max_message_chars:  # never converted: bounded work per record
        return CleanResult(None, "too_large", f"message {i}: {len(value)} characters, more than "
                                              f"--max-message-chars {options.max_message_chars}")
    bad = _SURROGATE.search(value)
    if bad:  # a lone UTF-16 half ("\ud83d") is not text: it cannot be written as UTF-8
        return CleanResult(None, "bad_text", f"message {i}: a lone surrogate U+{ord(bad.group(0)):04X}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not math.isfinite(weight) or weight < 0):
        return CleanResult(None, "bad_field", f"message {i}: weight {_short(weight)} is not a number >= 0")
    return {"role": mapped, "content": clean_text(value, kind, mapped),
            "weight": None if weight is None else float(weight)}


def clean_record(raw: RawRecord, options: CleanOptions) -> CleanResult:
    for name in ("id", "model", "system", "condition"):
        value = getattr(raw, name)
        if value and (_SURROGATE.search(value) or len(value) > options.max_message_chars):
            return CleanResult(None, "bad_text", f"'{name}' holds a lone surrogate or is too long")
    system = raw.system or ""
    items: list[dict] = []
    weights = raw.weights or [None] * len(raw.messages)
    for i, ((role, value), weight) in enumerate(zip(raw.messages, weights)):
        m = _message(i, role, value, weight, raw.kind, options)
        if isinstance(m, CleanResult):
            return m
        if m["role"] == "system":
            if items:
                return CleanResult(None, "unknown_role", f"message {i}: a system message after the first turn")
            system = (system + "\n" + m["content"]).strip() if system else m["content"]
            continue
        items.append(m)

    fixes = []
    if items and items[0]["role"] == "assistant":
        items = items[1:]
        fixes.append("dropped_leading_assistant")
    if items and items[-1]["role"] == "user":
        items = items[:-1]
        fixes.append("dropped_trailing_user")
    if len(items) < 2:
        return CleanResult(None, "no_exchange", f"{len(raw.messages)} messages, no user/assistant exchange",
                           tuple(fixes))
    for i, m in enumerate(items):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return CleanResult(None, "roles_not_alternating", f"turn {i} is '{m['role']}' twice in a row", tuple(fixes))
        if not m["content"].strip():
            return CleanResult(None, "empty_message", f"turn {i} ({m['role']}) is empty", tuple(fixes))
    if options._blocked is not None:
        for text in [system] + [m["content"] for m in items]:
            hit = options._blocked.search(text)
            if hit:
                return CleanResult(None, "blocked_word", f"contains {hit.group(0)!r}", tuple(fixes))

    record = {"id": raw.id, "group": raw.extra.get("group") or raw.id, "model": raw.model,
              "source": raw.extra.get("source") or raw.where, "system": system, "condition": raw.condition,
              "items": items}
    if raw.extra.get("truncated"):
        record["truncated"] = True
    return CleanResult(record, fixes=tuple(fixes), hash=record_hash(record))
