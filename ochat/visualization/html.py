"""One self-contained HTML page (Plotly inlined, no network) for a visualizer JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ochat.errors import OchatError
from ochat.templates import MODEL_TYPES
from ochat.utils.atomic import atomic_write_text

PAGE = Path(__file__).with_name("page.html")


def read_visualizer_json(path: str | Path) -> dict[str, Any]:
    """Load and check a visualizer JSON (ochat's or OpenChat's): equal-length text/embedding/color."""
    path = Path(path)
    if not path.is_file():
        raise OchatError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OchatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OchatError(f"{path}: expected a JSON object with 'text', 'embedding' and 'color'")
    for key in ("text", "embedding", "color"):
        if key not in data:
            hint = " (texts without embeddings? run `ochat viz project` first)" if key == "embedding" else ""
            raise OchatError(f"{path}: field '{key}' is missing{hint}")
        if not isinstance(data[key], list):
            raise OchatError(f"{path}: field '{key}': expected a list")
    n = len(data["text"])
    if n == 0:
        raise OchatError(f"{path}: field 'text' is empty: nothing to show")
    for key in ("embedding", "color"):
        if len(data[key]) != n:
            raise OchatError(f"{path}: field '{key}' has {len(data[key])} entries but 'text' has {n}")
    for i, p in enumerate(data["embedding"]):
        if not (isinstance(p, list) and len(p) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             and v == v and abs(v) != float("inf") for v in p)):
            raise OchatError(f"{path}: embedding[{i}]: expected [x, y, z] numbers, got {json.dumps(p)[:60]}")
    for i, t in enumerate(data["text"]):
        if not isinstance(t, str):
            raise OchatError(f"{path}: text[{i}]: expected a string")
    return data


def role_markers() -> dict[str, list]:
    """Role prefixes and special tokens of every model type, so the page can split a decoded text
    (OpenChat's files carry only that) back into turns."""
    roles: dict[str, str] = {}
    special: set[str] = set()
    for mt in MODEL_TYPES.values():
        special.update(t for t in (mt.bos, mt.eot, *mt.extra_special_tokens) if t)
        for cond in {"", mt.inference_condition, *mt.conditions}:
            for role in ("user", "assistant", "system"):
                marker = mt.role_prefix(role, cond).strip()
                if marker:          # most types' system text has no prefix
                    roles.setdefault(marker, role)
    ordered = sorted(roles.items(), key=lambda kv: -len(kv[0]))   # longest first: "GPT4 Correct User:" before "User:"
    return {"roles": [list(kv) for kv in ordered], "special": sorted(special, key=len, reverse=True)}


def _script_json(obj: Any) -> str:
    # Inside <script>, "</script>" or "<!--" in a conversation would end the block: escape every "<".
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    """The page reads a structured conversation when there is one: its decoded text, a second copy of
    the same words, stays out of the page (it halves the size of a large map)."""
    convs = data.get("conversation")
    if not isinstance(convs, list) or len(convs) != len(data["text"]):
        return data
    return {**data, "text": ["" if isinstance(c, dict) and c.get("items") else t for t, c in zip(data["text"], convs)]}


def render_html(data: dict[str, Any], title: str) -> str:
    import plotly.offline

    data = _slim(data)
    values = {
        "TITLE": title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"),
        "TITLE_JSON": _script_json(title),
        "PLOTLY": plotly.offline.get_plotlyjs(),
        "DATA": _script_json(data),
        "MARKERS": _script_json(role_markers()),
    }
    # One pass, so that a placeholder-like string inside the data is never substituted.
    return re.sub(r"__(TITLE_JSON|TITLE|PLOTLY|DATA|MARKERS)__", lambda m: values[m.group(1)], PAGE.read_text(encoding="utf-8"))


def write_html(path: str | Path, data: dict[str, Any], title: str) -> None:
    atomic_write_text(path, render_html(data, title))


def visualizer_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".visualizer.json", ".text.jsonl", ".text.json", ".jsonl", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem
