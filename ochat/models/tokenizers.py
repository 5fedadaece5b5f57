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
import sys
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ochat.errors import OchatError
from ochat.templates.chat_template import Difference, chat_template_for, check_chat_template
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


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer") -> PreTrainedTokenizerBase:
    if str(path) == MISTRAL_COMMON:
        return load_mistral_tokenizer()
    p = Path(path)
    if not p.is_dir():
        raise OchatError(f"{flag} {path}: not a directory (expected a Hugging Face tokenizer "
                         f"directory or '{MISTRAL_COMMON}')")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many kinds here; the user needs one line
        raise OchatError(f"{flag} {path}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model_type: ModelType) -> list[str]:
    """Add the model type's missing special tokens and set its chat_template (built for this tokenizer's
    treatment of spaces). Returns the added tokens."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in model_type.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.chat_template = chat_template_for(model_type, tokenizer)
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


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike,
                   model_type: ModelType | None = None) -> Difference | None:
    """Save a tokenizer and check the saved one as it loads back. It must tokenize exactly as `tokenizer`
    does (else OchatError: ochat never changes a tokenizer's behaviour). With `model_type`, ochat's
    chat_template for it is written only if it gives the encoder's ids on the probe conversations;
    otherwise none is written, a warning names the first differing token, and the difference is returned
    (OpenChat v1's "Human: " prefix ends with a space that no text renders as a token of its own)."""
    if model_type is not None:
        tokenizer.chat_template = chat_template_for(model_type, tokenizer)
    _save(tokenizer, Path(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    changed = behaviour_difference(tokenizer, loaded)
    if changed:
        raise OchatError(f"{out_dir}: the tokenizer saved there tokenizes differently from the one it was made "
                         f"from: {changed}; ochat does not change a tokenizer's behaviour (save it with "
                         f"its tokenizer.json, or report this)")
    diff = check_chat_template(model_type, loaded) if model_type is not None else None
    if diff is not None:
        template, tokenizer.chat_template = tokenizer.chat_template, None
        try:
            (Path(out_dir) / "chat_template.jinja").unlink(missing_ok=True)
            _save(tokenizer, Path(out_dir))
        finally:
            tokenizer.chat_template = template
        print(f"warning: {out_dir}: no chat_template written: ochat's chat_template for {model_type.name} does "
              f"not give the encoder's ids with this tokenizer ({diff}); ochat serve and the data pipeline "
              f"use the encoder", file=sys.stderr)
    return diff


def _save(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 re-derives a Llama tokenizer's pre-tokenizer from `legacy` on load; keep it.
    cfg_path = out_dir / "tokenizer_config.json"
    if getattr(tokenizer, "legacy", None) is not None and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["legacy"] = bool(tokenizer.legacy)
        cfg.pop("is_local", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def behaviour_probes(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts that tell tokenizer flavours apart: leading spaces and newlines, text after special tokens."""
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token, *tokenizer.get_added_vocab()) if t][:6]
    texts = ["Hello", " Hello", "  Hello", "\nHello", "Hello \n\n world  ", "GPT4 Correct User: Hi", ""]
    texts += [f"{t}GPT4 Correct User: Hi{t} Hello{t}\n x" for t in specials]
    return texts


def behaviour_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """The first probe text that `a` and `b` tokenize differently ('text': a's tokens vs b's), or None."""
    if a.get_vocab() != b.get_vocab():
        return "the vocabularies differ"
    for text in behaviour_probes(a):
        for kw in ({"add_special_tokens": True}, {"add_special_tokens": False, "split_special_tokens": True}):
            x, y = a(text, **kw)["input_ids"], b(text, **kw)["input_ids"]
            if x != y:
                return f"{text!r} -> {a.convert_ids_to_tokens(x)} vs {b.convert_ids_to_tokens(y)}"
    return None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable id of what a tokenizer maps text to (vocab, merges, added tokens, normalisation).

    Pre-tokenized data records it; training refuses data made with another tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # a slow tokenizer: vocab plus added tokens
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
