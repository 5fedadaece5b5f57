"""Keep conversations by their source's model label, or label them for C-RLFT.

Model labels are matched loosely: "GPT-4", "Model: GPT-4", "gpt-4", "gpt4" and
"Model: Default (GPT-3.5)" (matches "GPT-3.5") are all recognised; "GPT-4" does not match "GPT-4o".

A condition map gives each source a C-RLFT condition and a weight for its assistant turns:

    --condition-map 'GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1'        (simple syntax; weight defaults to 1)
    --condition-map '{"GPT-4": {"condition": "GPT4", "weight": 1.0}, "GPT-3.5": ["GPT3", 0.1]}'
    --condition-map map.json                                    (a file holding that JSON)

The key `*` matches every other conversation, labelled or not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from ochat.errors import OchatError

ANY = {"*", "any", "all"}
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_PAREN = re.compile(r"\(([^()]*)\)")


def normalise_label(label: str) -> str:
    return _NON_ALNUM.sub("", label.lower())


def label_candidates(label: str | None) -> set[str]:
    """The names a label can stand for: 'Model: Default (GPT-3.5)' -> {'defaultgpt35', 'gpt35', ...}."""
    if not label:
        return set()
    text = label.strip()
    if text.lower().startswith("model:"):
        text = text[len("model:"):]
    names = {text, *(_PAREN.findall(text)), _PAREN.sub("", text)}
    return {n for n in (normalise_label(x) for x in names) if n}


def label_matches(label: str | None, wanted: str) -> bool:
    if wanted.strip().lower() in ANY:
        return True
    return normalise_label(wanted.removeprefix("Model:").removeprefix("model:")) in label_candidates(label)


def parse_models(spec: str | Iterable[str] | None) -> list[str]:
    if spec is None:
        return ["GPT-4"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() for s in items if s.strip()] or ["any"]


def parse_condition_map(spec: str | dict | Path | None) -> dict[str, tuple[str, float]] | None:
    """`{label: (condition, weight)}` from a dict, JSON text, a JSON file or 'A=COND:W,B=COND:W'."""
    if spec is None or spec == "" or spec == {}:
        return None
    where = "--condition-map"
    obj: Any = spec
    if isinstance(spec, Path) or (isinstance(spec, str) and not spec.lstrip().startswith("{") and "=" not in spec):
        p = Path(spec)
        if not p.is_file():
            raise OchatError(f"{where} {spec}: not a file, JSON or 'LABEL=CONDITION:WEIGHT,...'")
        where = f"{where} {p}"
        obj = p.read_text(encoding="utf-8")
    if isinstance(obj, str):
        text = obj.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise OchatError(f"{where}: not valid JSON ({e})") from None
        else:
            obj = {}
            for part in text.split(","):
                if not part.strip():
                    continue
                label, sep, rest = part.partition("=")
                if not sep or not label.strip():
                    raise OchatError(f"{where}: '{part.strip()}' is not LABEL=CONDITION[:WEIGHT]")
                cond, _, weight = rest.rpartition(":") if ":" in rest else (rest, "", "1")
                obj[label.strip()] = [cond.strip(), weight.strip() or "1"]
    if not isinstance(obj, dict) or not obj:
        raise OchatError(f"{where}: expected a non-empty mapping of model label -> condition")
    out: dict[str, tuple[str, float]] = {}
    for label, v in obj.items():
        if isinstance(v, dict):
            cond, weight = v.get("condition"), v.get("weight", 1.0)
        elif isinstance(v, (list, tuple)) and len(v) in (1, 2):
            cond, weight = v[0], (v[1] if len(v) == 2 else 1.0)
        elif isinstance(v, str):
            cond, weight = v, 1.0
        else:
            raise OchatError(f"{where}: '{label}': expected {{\"condition\", \"weight\"}}, [condition, weight] "
                             f"or a condition string")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise OchatError(f"{where}: '{label}': weight {weight!r} is not a number") from None
        if not isinstance(cond, str):
            raise OchatError(f"{where}: '{label}': condition must be a string")
        if weight < 0:
            raise OchatError(f"{where}: '{label}': weight must be >= 0")
        out[str(label)] = (cond, weight)
    return out


def filter_record(record: dict, models: list[str], condition_map: dict[str, tuple[str, float]] | None
                  ) -> tuple[dict | None, str, str]:
    """(kept record or None, drop reason, detail). With a condition map, `models` is not used."""
    label = record.get("model")
    if condition_map:
        chosen = None
        for key, value in condition_map.items():  # specific labels win over '*'
            if key.strip() not in ANY and label_matches(label, key):
                chosen = value
                break
        if chosen is None:
            chosen = next((v for k, v in condition_map.items() if k.strip() in ANY), None)
        if chosen is None:
            return None, ("no_model_label" if not label else "model_not_in_condition_map"), str(label or "")
        condition, weight = chosen
        items = [{**m, "weight": weight if m["role"] == "assistant" else 0.0} for m in record["items"]]
        return {**record, "condition": condition, "items": items}, "", ""
    if any(label_matches(label, m) for m in models):
        return record, "", ""
    return None, ("no_model_label" if not label else "model_not_selected"), str(label or "")
