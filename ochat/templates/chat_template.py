"""The Hugging Face `chat_template` of a model type, built for one tokenizer and checked against the encoder.

The encoder concatenates pieces tokenized alone; a chat_template renders one text that the tokenizer
tokenizes in one go. Whether the two agree depends on how the tokenizer treats the space before a
piece: a SentencePiece tokenizer adds a dummy-prefix "▁" to a piece tokenized alone, and after a
special token inside a text it does (legacy, prepend_scheme "always") or does not ("first"); a
byte-level BPE adds nothing; Gemma's SentencePiece adds no dummy prefix at all. So the glue put
between two pieces in the text is measured on the tokenizer itself (`measure_glue`): for each kind
of piece end (start of text, special token, space, newline, other) and piece start (space, newline,
other), the first of "", " " that gives the concatenated ids. `check_chat_template` then renders
the probe conversations and names the first token where the template and the encoder differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ochat.templates.conversation import Conversation, Message
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import ModelType

ENDS = ("start", "special", "space", "newline", "other")
STARTS = ("space", "newline", "other")
_SAMPLE_END = {"space": "Human: ", "newline": "Say\n\n", "other": "GPT4 Correct User:"}
_SAMPLE_START = {"space": " Hello there", "newline": "\nHello there", "other": "Hello there"}
Glue = dict[str, dict[str, str]]


def measure_glue(mt: ModelType, tokenizer: Any) -> Glue:
    """glue[end][start]: the text to put between a piece ending like `end` and one starting like `start`."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    glue: Glue = {}
    for end in ENDS:
        left = {"start": "", "special": mt.eot}.get(end, _SAMPLE_END.get(end, ""))
        glue[end] = {}
        for start, right in _SAMPLE_START.items():
            want = ids(left) + ids(right)
            glue[end][start] = next((g for g in ("", " ") if ids(left + g + right) == want), "")
    return glue


def _q(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _prefix_expr(fmt: str) -> str:
    """A prefix format ("{c_}User:") as a Jinja expression over C (the condition)."""
    parts = re.split(r"(\{c_\}|\{_c\}|\{c\})", fmt)
    exprs = {"{c_}": "(C ~ ' ' if C else '')", "{_c}": "(' ' ~ C if C else '')", "{c}": "C"}
    return " ~ ".join(exprs.get(p, _q(p)) for p in parts if p) or "''"


def build_chat_template(mt: ModelType, glue: Glue) -> str:
    """A Jinja chat_template giving `ConversationEncoder`'s ids with a tokenizer of this glue.

    `apply_chat_template(messages, condition="Code")` selects a C-RLFT condition."""
    specials = "(" + ", ".join(_q(t) for t in mt.special_tokens) + ",)"
    clean = " | trim" if mt.trim else ""
    c_default = _q(mt.inference_condition) if mt.uses_condition else "''"
    cond = "{%- set C = condition if condition is defined and condition is not none else " + c_default + " -%}"
    if not mt.uses_condition:
        cond = "{%- set C = '' -%}"
    elif mt.condition_required:
        cond += "{%- if not C -%}{%- set C = " + _q(mt.inference_condition) + " -%}{%- endif -%}"
    eot = "{{- piece(" + _q(mt.eot) + ") -}}"
    system = ("{{- piece(" + _prefix_expr(mt.system_prefix) + ") -}}" if mt.system_prefix else "") \
        + "{{- piece(system) -}}" + (eot if mt.system_eot else "")
    return "".join([
        cond,
        "{%- set G = " + repr(glue) + " -%}",
        "{%- set SPECIALS = " + specials + " -%}",
        "{%- set ns = namespace(end='start') -%}",
        # A piece: the glue its start needs after the previous piece's end, then the piece itself.
        "{%- macro piece(text) -%}{%- if text -%}",
        "{%- if not text.startswith(SPECIALS) -%}{%- set s = text[:1] -%}",
        "{{- G[ns.end]['space' if s == ' ' else 'newline' if s in '\\n\\r\\t' else 'other'] -}}{%- endif -%}",
        "{{- text -}}{%- set e = text[-1:] -%}",
        "{%- set ns.end = 'special' if text.endswith(SPECIALS) else 'space' if e == ' ' "
        "else 'newline' if e in '\\n\\r\\t' else 'other' -%}",
        "{%- endif -%}{%- endmacro -%}",
        "{%- macro prefix(role) -%}{%- if role == 'user' -%}{{- " + _prefix_expr(mt.user_prefix) + " -}}"
        "{%- else -%}{{- " + _prefix_expr(mt.assistant_prefix) + " -}}{%- endif -%}{%- endmacro -%}",
        "{{- piece(" + _q(mt.bos) + ") -}}" if mt.bos else "",
        ("{{- piece(" + _prefix_expr(mt.condition_turn) + ") -}}" + eot) if mt.condition_turn else "",
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list -%}",
        "{%- set system = systems | join('\\n') -%}",
        "{%- set system = (system if system else " + _q(mt.default_system) + ")" + clean + " -%}",
        "{%- if system -%}" + system + "{%- endif -%}",
        "{%- for message in messages if message['role'] != 'system' -%}",
        "{%- if message['role'] not in ('user', 'assistant') -%}{{- raise_exception('Only user, assistant and "
        "system roles are supported') -}}{%- endif -%}",
        "{{- piece(prefix(message['role'])) -}}{{- piece(message['content']" + clean + ") -}}",
        "{%- if message['role'] == 'assistant' -%}" + eot + "{%- else -%}" + (eot if mt.eot_after_user else "")
        + "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- piece(prefix('assistant')) -}}{%- endif -%}",
    ])


def chat_template_for(mt: ModelType, tokenizer: Any) -> str:
    return build_chat_template(mt, measure_glue(mt, tokenizer))


@dataclass
class Probe:
    name: str
    conversation: Conversation
    inference: bool
    condition: str | None = None

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.conversation.system}] if self.conversation.system else []
        return system + [{"role": m.role, "content": m.content} for m in self.conversation.items]


def _conv(*turns: str, system: str = "") -> Conversation:
    roles = ("user", "assistant")
    return Conversation(system=system, items=[Message(role=roles[i % 2], content=t) for i, t in enumerate(turns)])


def probes(mt: ModelType) -> list[Probe]:
    """Single turn, multi-turn, system, each condition, empty contents, contents starting with a space or
    a newline; generation prompts and training layouts (ending with an answer)."""
    multi = _conv("Hello", "Hi", "How are you today?")
    out = [Probe("single turn", _conv("Hello"), True), Probe("multi-turn", multi, True),
           Probe("system", _conv("Hello", system="You are a helpful assistant."), True),
           Probe("training, system", _conv("Hello", "Hi", system="You are a helpful assistant."), False),
           Probe("empty contents", _conv("", "", "Hello"), True),
           Probe("content starting with a space", _conv(" Hello", " Hi", " again"), True),
           Probe("content starting with a newline", _conv("\nHello", "\n\nHi", "\nagain"), True),
           Probe("code", _conv("Write code:\n```python\nprint(1)\n```", "Sure:\n\n    x = 1\n"), False)]
    for c in dict.fromkeys((mt.inference_condition, *mt.conditions) if mt.uses_condition else ()):
        out.append(Probe(f"condition {c!r}", multi, True, c))
        out.append(Probe(f"training, condition {c!r}", _conv("Hello", "Hi"), False, c))
    return out


@dataclass
class Difference:
    probe: str
    index: int
    encoder: str        # "'▁G' (420)" or "(end)"
    template: str
    text: str           # the rendered template text

    def __str__(self) -> str:
        return (f"probe '{self.probe}': first difference at token {self.index}: encoder {self.encoder}, "
                f"chat_template {self.template} (template text {self.text!r})")


def _first_difference(tokenizer: Any, a: Sequence[int], b: Sequence[int]) -> tuple[int, str, str] | None:
    def show(ids: Sequence[int], i: int) -> str:
        return f"{tokenizer.convert_ids_to_tokens(ids[i])!r} ({ids[i]})" if i < len(ids) else "(end)"

    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i] != b[i]:
            return i, show(a, i), show(b, i)
    return None


def probe_results(mt: ModelType, tokenizer: Any,
                  chat_template: str | None = None) -> list[tuple[Probe, Difference | None]]:
    """Each probe with the first difference between the encoder's ids and the chat_template's (None: agree)."""
    encoder = ConversationEncoder(mt, tokenizer)
    results = []
    for p in probes(mt):
        want, _ = encoder.encode_one(p.conversation, inference=p.inference, condition=p.condition)
        # No condition at inference: the template's default (the type's inference condition), as the encoder's.
        kw = {} if p.inference and p.condition is None else {"condition": p.condition or ""}
        text = tokenizer.apply_chat_template(p.messages(), chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=p.inference, **kw)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        diff = _first_difference(tokenizer, want, got)
        results.append((p, None if diff is None else Difference(p.name, *diff, text=text)))
    return results


def check_chat_template(mt: ModelType, tokenizer: Any, chat_template: str | None = None) -> Difference | None:
    """The first probe where the chat_template and the encoder disagree, or None."""
    return next((d for _, d in probe_results(mt, tokenizer, chat_template) if d is not None), None)
