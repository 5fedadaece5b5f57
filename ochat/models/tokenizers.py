"""Loading, preparing and saving tokenizers for a model type.

`mistral-common` is accepted wherever a tokenizer directory is: it means the Mistral-7B v0.1
SentencePiece model shipped in the PyPI package `mistral-common` (the tokenizer of OpenChat 3.5).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ochat.errors import OchatError
from ochat.templates.registry import ModelType

MISTRAL_COMMON = "mistral-common"


def mistral_sentencepiece_file() -> Path:
    try:
        import mistral_common
    except ImportError:  # pragma: no cover - it is a dependency
        raise OchatError("the tokenizer 'mistral-common' needs the package mistral-common") from None
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def load_mistral_tokenizer() -> PreTrainedTokenizerBase:
    """Mistral-7B v0.1 as a HF Llama tokenizer with the legacy SentencePiece behaviour
    (a dummy-prefix space before every text segment), as OpenChat 3.5 was trained with."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(mistral_sentencepiece_file(), Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True, from_slow=True)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    if str(path) == MISTRAL_COMMON:
        return load_mistral_tokenizer()
    p = Path(path)
    if not p.is_dir():
        raise OchatError(f"--tokenizer {path}: not a directory (expected a Hugging Face tokenizer "
                         f"directory or '{MISTRAL_COMMON}')")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many kinds here; the user needs one line
        raise OchatError(f"--tokenizer {path}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model_type: ModelType) -> list[str]:
    """Add the model type's missing special tokens and set its chat_template. Returns the added tokens."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in model_type.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokenizer.chat_template = model_type.chat_template()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return missing


def load_prepared_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
                            model_type: ModelType) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """A tokenizer (a directory, `mistral-common`, or an object) with the model type's special tokens,
    and the tokens that had to be added (`mistral-common` lacks `<|end_of_turn|>`; it gets the same id
    as `ochat model tiny` gives it). A tokenizer object passed in is never changed: a copy is."""
    tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else load_tokenizer(tokenizer)
    vocab = tok.get_vocab()
    if all(t in vocab for t in model_type.special_tokens):
        return tok, []
    if tok is tokenizer:
        tok = copy.deepcopy(tok)
    return tok, prepare_tokenizer(tok, model_type)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 re-derives a Llama tokenizer's pre-tokenizer from `legacy` on load; keep it.
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    if getattr(tokenizer, "legacy", None) is not None and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["legacy"] = bool(tokenizer.legacy)
        cfg.pop("is_local", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable id of what a tokenizer maps text to (vocab, merges, added tokens, normalisation).

    Pre-tokenized data records it; training refuses data made with another tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # a slow tokenizer: vocab plus added tokens
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
