"""`ochat model add-eot` and `ochat model extend-context`: make a pretrained model ready for a model type.

add-eot: the type's special tokens (end-of-turn, ...) join the tokenizer; the input and output embeddings
grow by as many rows. OpenChat initialised them as the mean of the existing rows (LLaMA / Mistral: the
new token starts "average", so old tokens' logits and the loss start sane); OpenCoderPlus (StarCoder)
drew them from N(0, 0.02), StarCoder's own init.

extend-context: OpenChat-8192 raised LLaMA's limit from 2048 to 8192 and fine-tuned (RoPE
extrapolation), so by default only max_position_embeddings changes; `linear` is position
interpolation (RoPE scaling factor new/old).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ochat.errors import OchatError
from ochat.models.paths import read_json, require_model_dir, require_new_out
from ochat.models.model_dir import OCHAT_JSON, ModelDir, write_ochat_files
from ochat.models.tokenizers import prepare_tokenizer, save_tokenizer
from ochat.templates.registry import MODEL_TYPES, ModelType, get_model_type
from ochat.utils.atomic import atomic_dir

Init = Literal["mean", "normal"]
DEFAULT_MODEL_TYPE = "openchat_3.5"


def default_init(arch: str) -> Init:
    return "normal" if arch == "gpt_bigcode" else "mean"


def _load_config(model_dir: Path):
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # unknown architecture, broken JSON, ...: one line for the user
        raise OchatError(f"--model {model_dir}: cannot read config.json: {str(e).splitlines()[0]}") from None


def _load_model(model_dir: Path):
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    except Exception as e:
        raise OchatError(f"--model {model_dir}: cannot load the model: {str(e).splitlines()[0]}") from None


def _load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise OchatError(f"--model {model_dir}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None


@torch.no_grad()
def init_new_rows(weight: torch.Tensor, new_ids: list[int], init: Init, generator: torch.Generator) -> None:
    """Set rows `new_ids` of an embedding / lm_head matrix: the mean of all other rows, or N(0, 0.02)."""
    if not new_ids:
        return
    ids = torch.tensor(new_ids)
    if init == "mean":
        keep = torch.ones(weight.shape[0], dtype=torch.bool)
        keep[ids] = False
        weight[ids] = weight[keep].to(torch.float32).mean(dim=0).to(weight.dtype)
    else:
        rows = torch.empty(len(new_ids), weight.shape[1], dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
        weight[ids] = rows.to(weight.dtype)


def add_eot(model: str | os.PathLike, out: str | os.PathLike, model_type: str | None = None,
            init: Init | None = None, seed: int = 0) -> dict:
    model_dir = ModelDir(model, "--model", model_type, require_weights=True)
    src, meta = model_dir.path, model_dir.meta
    out = require_new_out(out)
    mt = model_dir.model_type_or(DEFAULT_MODEL_TYPE)
    config = _load_config(src)
    init = init or default_init(config.model_type)
    if init not in ("mean", "normal"):
        raise OchatError(f"--init {init}: expected mean or normal")
    tok = _load_tokenizer(src)
    lm = _load_model(src)
    old_rows = lm.get_input_embeddings().weight.shape[0]
    added = prepare_tokenizer(tok, mt)
    # the added tokens, and any rows a tokenizer that already had them needs (a model never resized)
    new_ids = sorted(set(tok.convert_tokens_to_ids(added)) | set(range(old_rows, len(tok))))
    # Only grow: a matrix padded beyond the tokenizer (e.g. to a multiple of 64) may hold the new ids already.
    if len(tok) > old_rows:
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    matrices = [lm.get_input_embeddings().weight]
    output = lm.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():  # not tied
        matrices.append(output.weight)
    for weight in matrices:
        init_new_rows(weight, new_ids, init, generator)
    eot_id = tok.convert_tokens_to_ids(mt.eot)
    lm.config.eos_token_id = eot_id
    lm.config.bos_token_id = tok.bos_token_id
    lm.config.pad_token_id = tok.pad_token_id
    extra = {k: v for k, v in meta.items() if k not in ("model_type", "ochat_version")}
    extra.update(arch=config.model_type, added_tokens=added, embedding_init=init)
    with atomic_dir(out) as tmp:
        lm.save_pretrained(str(tmp))
        save_tokenizer(tok, tmp, mt)
        write_ochat_files(tmp, mt, tok, extra)
    return {"out": out, "model_type": mt.name, "added": added, "ids": new_ids, "init": init,
            "vocab": (old_rows, lm.get_input_embeddings().weight.shape[0])}


def same_layout_type(mt: ModelType, max_context: int) -> ModelType | None:
    """The registered type that differs from `mt` only in its context (openchat -> openchat_8192)."""
    def layout(t: ModelType) -> ModelType:
        return dataclasses.replace(t, name="", max_context=0, aliases=(), description="")

    for t in {t.name: t for t in MODEL_TYPES.values()}.values():
        if t.max_context == max_context and layout(t) == layout(mt):
            return t
    return None


def extend_context(model: str | os.PathLike, out: str | os.PathLike, max_position_embeddings: int,
                   rope_scaling: Literal["none", "linear"] = "none") -> dict:
    src = require_model_dir(model, "--model")
    out = require_new_out(out)
    if rope_scaling not in ("none", "linear"):
        raise OchatError(f"--rope-scaling {rope_scaling}: expected none or linear")
    config = _load_config(src)
    new = max_position_embeddings
    learned = config.model_type == "gpt_bigcode"  # learned absolute position table (wpe), no RoPE
    old = config.n_positions if learned else getattr(config, "max_position_embeddings", None)
    if old is None or (not learned and not getattr(config, "rope_parameters", None)):
        raise OchatError(f"--model {src}: {config.model_type} has no RoPE max_position_embeddings to extend")
    if new <= old:
        raise OchatError(f"--max-position-embeddings {new}: must exceed the model's current limit {old}")
    if learned and rope_scaling == "none":
        # Extrapolation needs a position function; a learned table has no rows for positions >= old.
        raise OchatError(f"--model {src}: gpt_bigcode learns one embedding per position (n_positions={old}), "
                         "so there is nothing to extrapolate; use --rope-scaling linear to interpolate the table")

    meta = ModelDir(src).meta
    with atomic_dir(out) as tmp:
        if learned:
            lm = _load_model(src)
            with torch.no_grad():
                wpe = lm.transformer.wpe.weight
                # Position interpolation for a learned table: new position p reads old position p * (old-1)/(new-1).
                grown = torch.nn.functional.interpolate(wpe.T[None].float(), size=new, mode="linear",
                                                        align_corners=True)[0].T.to(wpe.dtype)
                lm.transformer.wpe = torch.nn.Embedding(new, wpe.shape[1], dtype=wpe.dtype)
                lm.transformer.wpe.weight.copy_(grown)
            lm.config.n_positions = new
            lm.save_pretrained(str(tmp))
            for f in src.iterdir():  # tokenizer, generation config, ochat.json
                if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
                    shutil.copy2(f, tmp / f.name)
            detail = {"n_positions": new, "wpe": "linear interpolation"}
        else:
            for f in src.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
            cfg = read_json(src / "config.json")
            cfg["max_position_embeddings"] = new
            if rope_scaling == "linear":
                rope = dict(config.rope_parameters)
                kind = rope.get("rope_type", "default")
                if kind not in ("default", "linear"):
                    raise OchatError(f"--model {src}: already uses {kind} RoPE scaling; only default or linear "
                                     "can be scaled linearly")
                factor = float(rope.get("factor", 1.0)) if kind == "linear" else 1.0
                rope.update(rope_type="linear", factor=factor * new / old)
                cfg["rope_parameters"] = rope
                cfg.pop("rope_scaling", None)  # the transformers 4 name; 5 reads rope_parameters
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            detail = {"max_position_embeddings": new, "rope_parameters": cfg.get("rope_parameters")}
        tok_cfg = tmp / "tokenizer_config.json"
        if tok_cfg.is_file():
            t = read_json(tok_cfg)
            if isinstance(t.get("model_max_length"), int) and t["model_max_length"] <= old:
                t["model_max_length"] = new
                tok_cfg.write_text(json.dumps(t, indent=2, ensure_ascii=False))
        new_type = None
        if meta.get("model_type"):
            mt = get_model_type(meta["model_type"])
            if mt.max_context < new:
                new_type = same_layout_type(mt, new)
            meta.update(model_type=(new_type or mt).name, max_context=new,
                        context_extension={"from": old, "rope_scaling": rope_scaling})
            (tmp / OCHAT_JSON).write_text(json.dumps(meta, indent=2))
    return {"out": out, "from": old, "to": new, "model_type": new_type.name if new_type else meta.get("model_type"),
            **detail}
