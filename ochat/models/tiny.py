"""`ochat model tiny`: a randomly initialised small model in HF format, ready for a model type.

Used by the tests, the benchmarks and the quickstart (no model hub is needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ochat.errors import OchatError
from ochat.models.model_dir import write_ochat_files
from ochat.models.tokenizers import load_tokenizer, prepare_tokenizer, save_tokenizer
from ochat.templates.registry import get_model_type
from ochat.utils.atomic import atomic_dir

Arch = Literal["llama", "mistral", "gpt_bigcode"]


def tiny_config(arch: Arch, vocab_size: int, max_positions: int, hidden_size: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int | None = None, intermediate_size: int | None = None,
                bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
    intermediate_size = intermediate_size or 4 * hidden_size
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                  tie_word_embeddings=False)
    if arch in ("llama", "mistral"):
        extra = {"sliding_window": None} if arch == "mistral" else {}
        return AutoConfig.for_model(arch, hidden_size=hidden_size, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                                    intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                                    rms_norm_eps=1e-5, **extra, **common)
    if arch == "gpt_bigcode":
        return AutoConfig.for_model("gpt_bigcode", n_embd=hidden_size, n_layer=layers, n_head=heads,
                                    n_inner=intermediate_size, n_positions=max_positions, multi_query=True, **common)
    raise OchatError(f"--arch {arch}: expected llama, mistral or gpt_bigcode")


def make_tiny_model(out: str | os.PathLike, tokenizer: str | os.PathLike, model_type: str, arch: Arch = "mistral",
                    hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
                    intermediate_size: int | None = None, max_positions: int | None = None,
                    seed: int = 0, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OchatError(f"--out {out}: already exists (choose a new directory)")
    mt = get_model_type(model_type)
    tok = load_tokenizer(tokenizer)
    prepare_tokenizer(tok, mt)
    config = tiny_config(arch, vocab_size=len(tok), max_positions=max_positions or mt.max_context,
                         hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                         intermediate_size=intermediate_size, bos_id=tok.bos_token_id,
                         eos_id=tok.convert_tokens_to_ids(mt.eot), pad_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tok, tmp, mt)
        write_ochat_files(tmp, mt, tok, {"arch": arch, "tiny": True})
    return out
