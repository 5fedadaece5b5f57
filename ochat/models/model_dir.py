"""A model directory as ochat reads and writes it: a Hugging Face model directory plus `ochat.json`.

`ochat.json` records the model type (the conversation layout the model was trained with) and how
the directory was made. Every command that takes `--model DIR [--model-type T]` opens it with
`ModelDir`, so "the flag, else ochat.json, else one clear error" is decided in one place.
No torch import here: a wrong path is reported before seconds of imports.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ochat.errors import OchatError
from ochat.models.paths import require_model_dir
from ochat.templates.registry import ModelType, get_model_type

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ochat.templates.encoder import ConversationEncoder

OCHAT_JSON = "ochat.json"
AUTO = ("", "auto")


def read_ochat_json(model_dir: str | os.PathLike) -> dict:
    """The directory's ochat.json, {} if it has none."""
    p = Path(model_dir) / OCHAT_JSON
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OchatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise OchatError(f"{p}: expected a JSON object")
    return meta


def write_ochat_files(out: Path, model_type: ModelType, tokenizer: "PreTrainedTokenizerBase",
                      extra: dict | None = None) -> None:
    """generation_config.json (stop at end-of-turn) and ochat.json (the model type) for a model dir."""
    from transformers import GenerationConfig

    import ochat

    eot_id = tokenizer.convert_tokens_to_ids(model_type.eot)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eot_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(out))
    meta = {"model_type": model_type.name, "ochat_version": ochat.__version__, **(extra or {})}
    (Path(out) / OCHAT_JSON).write_text(json.dumps(meta, indent=2))


class ModelDir:
    """`--model DIR` with an optional `--model-type` override ("auto" or "" = from ochat.json)."""

    def __init__(self, path: str | os.PathLike, flag: str = "--model", model_type: str | None = None,
                 require_weights: bool = False, allow_lora_adapter: bool = False):
        """`allow_lora_adapter`: a peft adapter directory (adapter_config.json, no config.json) is accepted too."""
        p = Path(path).expanduser()
        if require_weights:
            require_model_dir(p, flag)
        elif not p.is_dir():
            raise OchatError(f"{flag} {path}: not a directory (expected a Hugging Face model directory)")
        elif not (p / "config.json").is_file() and not (allow_lora_adapter and (p / "adapter_config.json").is_file()):
            raise OchatError(f"{flag} {path}: not a model directory (no config.json"
                             + (" and no adapter_config.json)" if allow_lora_adapter else ")"))
        self.path = p
        self.flag = flag
        self.override = None if model_type is None or model_type in AUTO else model_type
        if self.override:
            get_model_type(self.override)  # a wrong name fails now, not after loading a model

    def __fspath__(self) -> str:
        return str(self.path)

    @cached_property
    def meta(self) -> dict:
        return read_ochat_json(self.path)

    @property
    def model_type_name(self) -> str | None:
        """The flag's type, else ochat.json's, else None."""
        return self.override or self.meta.get("model_type") or None

    def model_type_or(self, default: str | None = None) -> ModelType:
        """The model type; `default` where neither the flag nor ochat.json gives one, else an error."""
        name = self.model_type_name or default
        if not name:
            raise OchatError(f"{self.flag} {self.path}: no {OCHAT_JSON} with a model_type; pass --model-type "
                             f"(e.g. openchat_3.5)")
        return get_model_type(name)

    @cached_property
    def model_type(self) -> ModelType:
        return self.model_type_or(None)

    @cached_property
    def tokenizer(self) -> "PreTrainedTokenizerBase":
        from ochat.models.tokenizers import load_tokenizer

        return load_tokenizer(self.path, flag=self.flag)

    def encoder(self) -> "ConversationEncoder":
        from ochat.templates.encoder import ConversationEncoder

        return ConversationEncoder(self.model_type, self.tokenizer)
