"""Model types: the conversation layout each released model was trained with, as upstream defines it.

A conversation becomes a list of *pieces*: bos, (a condition turn), system, role prefixes, contents,
end-of-turn tokens. The token ids are the concatenation of each piece tokenized on its own (see
`encoder.py`), as imoneoi/openchat's `ConversationTemplate` builds them. Prefix formats use `{c_}`
for "the C-RLFT condition and a space" and `{_c}` for "a space and the condition" (both empty without
a condition), and `{c}` for the bare condition. The Hugging Face `chat_template` that renders the
same ids as text depends on how a tokenizer treats spaces; `chat_template.py` builds it for one.

Sources (imoneoi/openchat unless named; `git show <commit>:<path>`):
- openchat, openchat_8192, opencoder: de15540 `ochat/config/model_config.py` (OpenChat v1 release)
- openchat_v2: 19e6250 `ochat/config/model_config.py` (`_v2_conditional_prefix`)
- openchat_v3.1: 19e6250 `ochat/config/model_config.py` (`openchat_v3.1_llama2`, `_v3_condition`)
- openchat_v3.2, openchat_3.5, openchat_3.5_gemma_new, openchat_3.6: 47a3596 `ochat/config/__init__.py`
  and `ochat/config/conversation_template.py` (system: bare text + eot unless `system_as_role`; 3.6:
  a condition-free `System` header, and its released `hf_chat_template` trims every content)
- vicuna_v1.1: lm-sys/FastChat 0e6d3e4 `fastchat/conversation.py` (`vicuna_v1.1`, ADD_COLON_TWO)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ochat.errors import OchatError

Family = Literal["sentencepiece", "bytelevel"]
ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class ModelType:
    name: str
    family: Family                             # the released model's tokenizer kind (docs; decoding pieces)
    max_context: int
    eot: str                                   # end-of-turn special token
    bos: str = ""                              # "" = no bos
    user_prefix: str = "{c_}User:"
    assistant_prefix: str = "{c_}Assistant:"
    system_prefix: str = ""                    # "" = the system text stands alone (bare text)
    system_eot: bool = True                    # eot after the system text
    eot_after_user: bool = True
    condition_turn: str = ""                   # a first turn naming the condition (v3.1: "Assistant is {c}")
    uses_condition: bool = True
    condition_required: bool = False           # no layout without one: "" means inference_condition
    inference_condition: str = ""              # condition used at inference when none is given
    conditions: tuple[str, ...] = ()           # conditions offered to users (any string is accepted)
    trim: bool = False                         # strip contents and system (3.6's released chat_template)
    default_system: str = ""
    extra_special_tokens: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def special_tokens(self) -> list[str]:
        """Tokens a tokenizer must know as special for this type (added by `ochat model add-eot`)."""
        return [t for t in (self.bos, self.eot, *self.extra_special_tokens) if t]

    def condition_for(self, condition: str) -> str:
        if not self.uses_condition:
            return ""
        return condition or (self.inference_condition if self.condition_required else "")

    def role_prefix(self, role: str, condition: str = "") -> str:
        """The prefix of a role's turn ("" for a system that stands alone)."""
        fmt = {"user": self.user_prefix, "assistant": self.assistant_prefix, "system": self.system_prefix}[role]
        return format_prefix(fmt, self.condition_for(condition))

    def condition_text(self, condition: str) -> str:
        return format_prefix(self.condition_turn, self.condition_for(condition)) if self.condition_turn else ""

    def clean(self, text: str) -> str:
        return text.strip() if self.trim else text

    def layout_text(self) -> str:
        """A system + user + assistant exchange as text (README, `template list`); the generation prompt is
        `role_prefix("assistant")`. Pieces are joined by a space where a dummy prefix puts one."""
        c = self.inference_condition if self.uses_condition else ""
        out = [self.bos]
        if self.condition_turn:
            out += [self.condition_text(c), self.eot]
        system = [self.role_prefix("system", c), "{system}", self.eot if self.system_eot else ""]
        out += system
        for role in ("user", "assistant"):
            eot = self.eot if role == "assistant" or self.eot_after_user else ""
            out += [self.role_prefix(role, c), "{" + role + "}", eot]
        text = ""
        for piece in filter(None, out):
            glue = self.family == "sentencepiece" and text and not text.endswith((" ", "\n", *self.special_tokens)) \
                and piece not in self.special_tokens
            text += (" " if glue else "") + piece
        return text


def format_prefix(fmt: str, condition: str) -> str:
    return (fmt.replace("{c_}", f"{condition} " if condition else "")
               .replace("{_c}", f" {condition}" if condition else "").replace("{c}", condition))


_OPENCHAT_CONDITIONS = ("GPT4 Correct", "Code", "Math Correct", "GPT4", "GPT3")

MODEL_TYPES: dict[str, ModelType] = {}


def register(mt: ModelType) -> ModelType:
    for key in (mt.name, *mt.aliases):
        MODEL_TYPES[key] = mt
    return mt


_V1 = dict(family="sentencepiece", bos="<s>", eot="<|end_of_turn|>", user_prefix="Human: ",
           assistant_prefix="Assistant: ", uses_condition=False)
register(ModelType(name="openchat", max_context=2048, **_V1,
                   description="OpenChat v1 (LLaMA-13B): 'Human: ' / 'Assistant: ' (trailing space), context 2048"))
register(ModelType(name="openchat_8192", max_context=8192, **_V1,
                   description="OpenChat-8192 (LLaMA-13B, context extended to 8192)"))
register(ModelType(
    name="opencoder", family="bytelevel", max_context=8192, bos="", eot="<|end_of_turn|>", uses_condition=False,
    description="OpenCoderPlus (StarCoder): 'User:' / 'Assistant:', no bos"))
register(ModelType(
    name="openchat_v2", family="sentencepiece", max_context=2048, bos="<s>", eot="<|end_of_turn|>",
    user_prefix="User:", assistant_prefix="Assistant{_c}:", condition_required=True, inference_condition="GPT4",
    conditions=("GPT4", "GPT3"), aliases=("openchat_v2_w",),
    description="OpenChat V2 / V2-W (LLaMA-13B): 'User:' / 'Assistant GPT4:' (or GPT3)"))
register(ModelType(
    name="openchat_v3.1", family="sentencepiece", max_context=4096, bos="<s>", eot="<|end_of_turn|>",
    user_prefix="User:", assistant_prefix="Assistant:", condition_turn="Assistant is {c}", condition_required=True,
    inference_condition="GPT4", conditions=("GPT4", "GPT3"), aliases=("openchat_v3.1_llama2",),
    description="OpenChat 3.1 (Llama-2-13B): a first turn 'Assistant is GPT4', then 'User:' / 'Assistant:'"))
register(ModelType(
    name="openchat_v3.2", family="sentencepiece", max_context=4096, bos="<s>", eot="<|end_of_turn|>",
    inference_condition="GPT4", conditions=("GPT4", "GPT3"), aliases=("openchat_v3.2_super",),
    description="OpenChat 3.2 / 3.2 SUPER (Llama-2-13B): 'GPT4 User:' / 'GPT4 Assistant:'"))
register(ModelType(
    name="openchat_3.5", family="sentencepiece", max_context=8192, bos="<s>", eot="<|end_of_turn|>",
    inference_condition="GPT4 Correct", conditions=_OPENCHAT_CONDITIONS, aliases=("openchat_v3.2_mistral",),
    description="OpenChat 3.5 / 3.5-1210 / 3.5-0106 (Mistral-7B): 'GPT4 Correct User:', conditions "
                "GPT4 Correct / Code / Math Correct"))
register(ModelType(
    name="openchat_3.5_gemma_new", family="sentencepiece", max_context=8192, bos="<bos>", eot="<end_of_turn>",
    inference_condition="GPT4 Correct", conditions=_OPENCHAT_CONDITIONS, aliases=("openchat_v3.2_gemma_new",),
    description="OpenChat 3.5-0106-gemma (Gemma-7B): the 3.5 layout with '<end_of_turn>'"))
register(ModelType(
    name="openchat_3.6", family="bytelevel", max_context=8192, bos="<|begin_of_text|>", eot="<|eot_id|>",
    user_prefix="<|start_header_id|>{c_}User<|end_header_id|>\n\n",
    assistant_prefix="<|start_header_id|>{c_}Assistant<|end_header_id|>\n\n",
    system_prefix="<|start_header_id|>System<|end_header_id|>\n\n", trim=True, inference_condition="GPT4 Correct",
    conditions=_OPENCHAT_CONDITIONS, extra_special_tokens=("<|start_header_id|>", "<|end_header_id|>"),
    description="OpenChat 3.6 (Llama-3-8B): Llama-3 headers, a plain 'System' header, contents trimmed"))
register(ModelType(
    name="vicuna_v1.1", family="sentencepiece", max_context=2048, bos="<s>", eot="</s>", user_prefix="USER:",
    assistant_prefix="ASSISTANT:", uses_condition=False, system_eot=False, eot_after_user=False,
    default_system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    description="Vicuna v1.1 (FastChat): system sentence, 'USER: ' / 'ASSISTANT: ', '</s>' after answers"))


def get_model_type(name: str) -> ModelType:
    try:
        return MODEL_TYPES[name]
    except KeyError:
        raise OchatError(f"unknown model type {name!r}; known: {', '.join(sorted(MODEL_TYPES))}") from None
