"""Model types: the conversation layout each released model was trained with.

A conversation becomes a list of *pieces* (bos, system, role prefixes, contents, end-of-turn tokens).
Token ids are the concatenation of each piece tokenized on its own (see `encoder.py`); the
Hugging Face `chat_template` renders the same pieces as text so that tokenizing the text gives the
same ids. For SentencePiece tokenizers (LLaMA, Mistral) every piece gets a dummy-prefix space when
tokenized alone, so the text form joins pieces with " " (except after a special token); byte-level
BPE tokenizers (StarCoder, Llama-3) add nothing, so their text form joins pieces with "".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ochat.errors import OchatError

Family = Literal["sentencepiece", "bytelevel"]


@dataclass(frozen=True)
class ModelType:
    name: str
    family: Family
    max_context: int
    eot: str                                   # end-of-turn special token
    bos: str = ""                              # "" = no bos
    role_names: dict[str, str] = field(default_factory=lambda: {"user": "User", "assistant": "Assistant",
                                                                  "system": "System"})
    prefix_format: str = "{role}:"             # {role} = "<condition> <RoleName>" stripped
    uses_condition: bool = True
    inference_condition: str = ""              # condition used at inference when none is given
    conditions: tuple[str, ...] = ()           # conditions offered to users (any string is accepted)
    system_as_role: bool = True                # system rendered with a role prefix + eot
    system_eot: bool = True                    # eot after a raw (non-role) system text
    eot_after_user: bool = True
    default_system: str = ""
    extra_special_tokens: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def special_tokens(self) -> list[str]:
        """Tokens a tokenizer must know as special for this type (added by `ochat model add-eot`)."""
        return [t for t in (self.bos, self.eot, *self.extra_special_tokens) if t]

    @property
    def text_separator(self) -> str:
        return " " if self.family == "sentencepiece" else ""

    def role_prefix(self, role: str, condition: str = "") -> str:
        name = self.role_names[role]
        label = f"{condition} {name}".strip() if self.uses_condition else name
        return self.prefix_format.format(role=label)

    def chat_template(self) -> str:
        """A Jinja chat_template for HF tokenizers that yields the same ids as `ConversationEncoder`.

        `apply_chat_template(messages, condition="Code")` selects a C-RLFT condition."""
        q = _jinja_str
        before, after = self.prefix_format.split("{role}")
        label = "((condition ~ ' ' ~ ROLE_NAMES[role]) | trim)" if self.uses_condition else "ROLE_NAMES[role]"
        eot = "{{- piece(" + q(self.eot) + ", true) -}}"
        if self.system_as_role:
            system = "{{- piece(prefix('system'), " + _ends_special(after) + ") -}}{{- piece(content) -}}" + eot
        else:
            system = "{{- piece(content) -}}" + (eot if self.system_eot else "")
        user_eot = eot if self.eot_after_user else ""
        return "".join([
            "{%- set ROLE_NAMES = {" + ", ".join(f"{q(k)}: {q(v)}" for k, v in self.role_names.items()) + "} -%}",
            "{%- if condition is not defined or condition is none -%}{%- set condition = "
            + q(self.inference_condition) + " -%}{%- endif -%}",
            # Pieces are joined with SEP unless the previous piece was a special token (or the start).
            "{%- set ns = namespace(after_special=true) -%}",
            "{%- macro piece(text, special=false) -%}{%- if not (ns.after_special or special) -%}{{- " + q(self.text_separator)
            + " -}}{%- endif -%}{{- text -}}{%- set ns.after_special = special -%}{%- endmacro -%}",
            "{%- macro prefix(role) -%}{{- " + q(before) + " ~ " + label + " ~ " + q(after) + " -}}{%- endmacro -%}",
            "{{- piece(" + q(self.bos) + ", true) -}}" if self.bos else "",
            "{%- set systems = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list -%}",
            "{%- set content = systems | join('\\n') if systems else " + q(self.default_system) + " -%}",
            "{%- if content -%}" + system + "{%- endif -%}",
            "{%- for message in messages if message['role'] != 'system' -%}",
            "{{- piece(prefix(message['role']), " + _ends_special(after) + ") -}}{{- piece(message['content']) -}}",
            "{%- if message['role'] == 'assistant' -%}" + eot + "{%- else -%}" + user_eot + "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- piece(prefix('assistant'), " + _ends_special(after) + ") -}}{%- endif -%}",
        ])


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _ends_special(prefix_after: str) -> str:
    return "true" if prefix_after.endswith(">") else "false"


_OPENCHAT_CONDITIONS = ("GPT4 Correct", "Code", "Math Correct", "GPT4", "GPT3")

MODEL_TYPES: dict[str, ModelType] = {}


def register(mt: ModelType) -> ModelType:
    for key in (mt.name, *mt.aliases):
        MODEL_TYPES[key] = mt
    return mt


register(ModelType(
    name="openchat", family="sentencepiece", max_context=2048, bos="<s>", eot="<|end_of_turn|>",
    role_names={"user": "Human", "assistant": "Assistant", "system": "System"}, uses_condition=False,
    system_as_role=False, description="OpenChat v1 (LLaMA-13B): 'Human: ' / 'Assistant: ', context 2048"))
register(ModelType(
    name="openchat_8192", family="sentencepiece", max_context=8192, bos="<s>", eot="<|end_of_turn|>",
    role_names={"user": "Human", "assistant": "Assistant", "system": "System"}, uses_condition=False,
    system_as_role=False, description="OpenChat-8192 (LLaMA-13B, extended context)"))
register(ModelType(
    name="opencoder", family="bytelevel", max_context=8192, bos="", eot="<|end_of_turn|>",
    uses_condition=False, system_as_role=False, description="OpenCoderPlus (StarCoder): 'User:' / 'Assistant:'"))
register(ModelType(
    name="openchat_v3.2", family="sentencepiece", max_context=4096, bos="<s>", eot="<|end_of_turn|>",
    inference_condition="GPT4", conditions=("GPT4", "GPT3"),
    description="OpenChat 3.2 (Llama-2): '{condition} User:' / '{condition} Assistant:'"))
register(ModelType(
    name="openchat_3.5", family="sentencepiece", max_context=8192, bos="<s>", eot="<|end_of_turn|>",
    inference_condition="GPT4 Correct", conditions=_OPENCHAT_CONDITIONS, aliases=("openchat_v3.2_mistral",),
    description="OpenChat 3.5 (Mistral-7B): 'GPT4 Correct User:' ... conditions GPT4 Correct / Code / Math Correct"))
register(ModelType(
    name="openchat_3.6", family="bytelevel", max_context=8192, bos="<|begin_of_text|>", eot="<|eot_id|>",
    prefix_format="<|start_header_id|>{role}<|end_header_id|>\n\n", inference_condition="GPT4 Correct",
    conditions=_OPENCHAT_CONDITIONS, extra_special_tokens=("<|start_header_id|>", "<|end_header_id|>"),
    description="OpenChat 3.6 (Llama-3 header style)"))
register(ModelType(
    name="vicuna_v1.1", family="sentencepiece", max_context=2048, bos="<s>", eot="</s>",
    role_names={"user": "USER", "assistant": "ASSISTANT", "system": "SYSTEM"}, uses_condition=False,
    system_as_role=False, system_eot=False, eot_after_user=False,
    default_system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    description="Vicuna v1.1: system sentence, ' USER: ' / ' ASSISTANT: ', '</s>' after answers"))


def get_model_type(name: str) -> ModelType:
    try:
        return MODEL_TYPES[name]
    except KeyError:
        raise OchatError(f"unknown model type {name!r}; known: {', '.join(sorted(MODEL_TYPES))}") from None
