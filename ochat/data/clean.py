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
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from bs4 import BeautifulSoup, Tag
from markdownify import MarkdownConverter

from ochat.data.sources import RawRecord
from ochat.templates.conversation import SHAREGPT_ROLES

try:  # lxml parses ~2x faster than Python's html.parser; both give the same Markdown here
    import lxml  # noqa: F401
    BS4_PARSER = "lxml"
except ImportError:  # pragma: no cover
    BS4_PARSER = "html.parser"

DEFAULT_BLOCKED_WORDS = ("openai",)

# A message is HTML if it starts with a tag ChatGPT's renderer emits; human turns are plain text
# (and may contain "<div>" as code a user pasted, which must stay as is).
_HTML_START = re.compile(r"^\s*<(?:p|div|pre|ol|ul|table|h[1-6]|blockquote|span|code|br|hr|em|strong|a|img)\b",
                         re.I)
_PRE = re.compile(r"<pre\b[^>]*>(.*?)</pre\s*>", re.I | re.S)
_CODE = re.compile(r"<code\b([^>]*)>(.*)</code\s*>", re.I | re.S)
_LANG_CLASS = re.compile(r"\blanguage-([\w+#.-]+)")
_HEADER_LANG = re.compile(r"<span\b[^>]*>\s*([\w+#. -]{1,40}?)\s*</span>\s*<button\b", re.I)
_BUTTON = re.compile(r"<button\b.*?</button\s*>", re.I | re.S)
_NOISE = re.compile(r"<(button|svg|script|style)\b.*?</\1\s*>", re.I | re.S)
_TAG = re.compile(r"<[^>]+>")
_PLACEHOLDER = re.compile(r"^([ \t]*(?:(?:[-*+]|\d+\.)[ \t]+)?)ochatcodeblock(\d+)z[ \t]*$", re.M)

# ChatGPT page artefacts (the patterns of FastChat's clean_sharegpt.py, applied after conversion)
_REGENERATE = re.compile(r"^\s*\d+ / \d+")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_FLAT_CODE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*(?:Copy code)+(.+?)\s*?```", re.S)
_EMPTY_COPY_CODE = re.compile(r"```[^\n`]*?Copy code\s*```")
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})", re.M)
_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"\s+")


class _Converter(MarkdownConverter):
    """markdownify with ChatGPT-friendly defaults; `<pre>` left after the fast path is fenced verbatim."""

    def __init__(self, **options: Any):
        super().__init__(heading_style="ATX", bullets="-", escape_underscores=False, escape_asterisks=False,
                         escape_misc=False, strip_document="strip", **options)

    def convert_pre(self, el, text, parent_tags):  # only reached for a <pre> the regex did not match
        code = el.find("code")
        lang = _code_language(" ".join((code.get("class") or [])) if code else "", "")
        body = (code or el).get_text()
        return "\n\n" + _fence(lang, body) + "\n\n"


_CONVERTER = _Converter()


class _FastTag(Tag):
    """markdownify asks every tag `find_parent('pre')`; bs4's generic search makes that the hot spot."""

    def find_parent(self, name=None, attrs={}, string=None, **kwargs):  # noqa: B006 - bs4's signature
        if isinstance(name, str) and not attrs and string is None and not kwargs:
            p = self.parent
            while p is not None:
                if p.name == name:
                    return p
                p = p.parent
            return None
        return super().find_parent(name, attrs, string, **kwargs)


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


def _pre_to_fence(inner: str) -> str:
    """A ChatGPT `<pre>`: header (language, "Copy code" button) + `<code>` with highlight spans."""
    m = _CODE.search(inner)
    if m:
        lang = _code_language(m.group(1), inner[:m.start()])
        body = m.group(2)
    else:
        lang = _code_language("", inner)
        body = _BUTTON.sub("", inner)
    # Tags are only highlight spans here; the text (indentation, underscores) is kept verbatim.
    return _fence(lang, htmllib.unescape(_TAG.sub("", body)))


def html_to_markdown(value: str) -> str:
    """ChatGPT's rendered HTML -> Markdown with code blocks (language, indentation), lists, tables, links."""
    blocks: list[str] = []

    def stash(m: re.Match) -> str:
        blocks.append(_pre_to_fence(m.group(1)))
        return f"<p>ochatcodeblock{len(blocks) - 1}z</p>"

    value = _NOISE.sub("", _PRE.sub(stash, value))
    soup = BeautifulSoup(value, BS4_PARSER, element_classes={Tag: _FastTag})
    md = _CONVERTER.convert_soup(soup)

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
    text = _COPY_CHARS.sub("", text)
    text = _EMPTY_COPY_CODE.sub("", text)
    text = _FLAT_CODE.sub(lambda m: f"```{m.group(1)}\n{m.group(2).strip(chr(10))}\n```", text)
    return _collapse_blank_lines(text).strip()


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
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def record_hash(record: dict) -> str:
    h = hashlib.sha256()
    h.update(normalise_for_hash(record.get("system", "")).encode("utf-8"))
    for m in record["items"]:
        h.update(b"\x1e" + m["role"].encode() + b"\x1f" + normalise_for_hash(m["content"]).encode("utf-8"))
    return h.hexdigest()


@dataclass
class CleanOptions:
    blocked_words: tuple[str, ...] = DEFAULT_BLOCKED_WORDS
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


def clean_record(raw: RawRecord, options: CleanOptions) -> CleanResult:
    system = raw.system or ""
    items: list[dict] = []
    weights = raw.weights or [None] * len(raw.messages)
    for i, ((role, value), weight) in enumerate(zip(raw.messages, weights)):
        mapped = SHAREGPT_ROLES.get(str(role).lower()) if isinstance(role, str) else None
        if mapped is None:
            return CleanResult(None, "unknown_role", f"message {i}: role {role!r}")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return CleanResult(None, "bad_field", f"message {i}: content is {type(value).__name__}, expected text")
        if weight is not None and not isinstance(weight, (int, float)):
            return CleanResult(None, "bad_field", f"message {i}: weight {weight!r} is not a number")
        content = clean_text(value, raw.kind, mapped)
        if mapped == "system":
            if items:
                return CleanResult(None, "unknown_role", f"message {i}: a system message after the first turn")
            system = (system + "\n" + content).strip() if system else content
            continue
        items.append({"role": mapped, "content": content, "weight": None if weight is None else float(weight)})

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
