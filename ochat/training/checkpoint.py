"""Checkpoints. Every write goes to a hidden temporary directory that is renamed into place at the end,
so a crash or a full disk never leaves a half-written checkpoint and never harms the previous one.

- `SAVE/ep_N/`: a Hugging Face model directory (safetensors, tokenizer with chat_template,
  generation_config.json, ochat.json with the model type and the training arguments), loadable by
  `AutoModelForCausalLM.from_pretrained` and `ochat serve`. N counts epochs from 0, as in the seed.
- `SAVE/state/`: what `--resume` needs (full model and optimiser state, step, sampler position, RNG).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ochat.errors import OchatError
from ochat.models.tiny import read_ochat_json, write_ochat_files
from ochat.models.tokenizers import load_tokenizer, save_tokenizer
from ochat.templates.registry import get_model_type
from ochat.training.distributed import Dist, unwrap
from ochat.utils.atomic import atomic_dir

STATE_DIR = "state"
# A full disk: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def epoch_dir(save: Path, epoch: int) -> Path:
    return save / f"ep_{epoch}"


def _is_deepspeed(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


@contextlib.contextmanager
def write_guard(path: Path) -> Iterator[None]:
    """A failed write (full disk, permissions) becomes one clear line; atomic_dir has already removed the
    temporary directory, so the previous checkpoint at `path` is untouched."""
    try:
        yield
    except WRITE_ERRORS as e:
        if not isinstance(e, OSError) and not any(w in str(e).lower() for w in ("writ", "space", "i/o", "io error")):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OchatError(f"{path}: writing the checkpoint failed ({reason}); the previous checkpoint is intact") from e


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (a collective under FSDP / ZeRO-3: call on every rank)."""
    if _is_deepspeed(model):
        if model.zero_optimization_stage() == 3:
            return model._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    return get_model_state_dict(model, options=FULL)


def save_model(path: Path, model: Any, base_model: Path, model_type: str, d: Dist, training_args: dict,
               merge_lora: bool, epoch: int) -> Path | None:
    """Write `path` (rank 0) as a HF model directory. Every rank must call it."""
    state = full_model_state(model)
    if not d.is_main:
        d.barrier()
        return None
    hf_model = unwrap(model)
    is_peft = hasattr(hf_model, "peft_config")
    with write_guard(path), atomic_dir(path, overwrite=True) as tmp:
        if is_peft and merge_lora:
            # Merge into a copy so that training can go on with the adapters.
            merged = copy.deepcopy(hf_model).merge_and_unload()
            merged.save_pretrained(str(tmp), safe_serialization=True)
            del merged
        elif is_peft:
            hf_model.save_pretrained(str(tmp), safe_serialization=True)  # adapter only
        else:
            hf_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        tokenizer = load_tokenizer(base_model)
        save_tokenizer(tokenizer, tmp)
        base_meta = read_ochat_json(base_model)
        extra = {k: v for k, v in base_meta.items() if k not in ("model_type", "ochat_version")}
        extra.update(base_model=str(base_model), epoch=epoch, training=training_args)
        write_ochat_files(tmp, get_model_type(model_type), tokenizer, extra)
        if (base_model / "generation_config.json").exists():
            shutil.copy(base_model / "generation_config.json", tmp / "generation_config.json")
    d.barrier()
    return path


def save_state(save: Path, model: Any, optimizer: torch.optim.Optimizer, progress: dict, d: Dist) -> None:
    """Atomically replace SAVE/state with the current training state. Every rank must call it."""
    path = save / STATE_DIR
    if _is_deepspeed(model):
        # DeepSpeed writes its own (possibly sharded) files from every rank into a fresh directory.
        tmp = save / f".{STATE_DIR}.ds.tmp"
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        d.barrier()
        model.save_checkpoint(str(tmp), tag="ds")
        d.barrier()
        if d.is_main:
            with atomic_dir(path, overwrite=True) as out:
                os.replace(tmp, out / "deepspeed")
                _write_progress(out, progress)
        d.barrier()
        return
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    if d.is_main:
        with write_guard(path), atomic_dir(path, overwrite=True) as out:
            torch.save({"model": model_sd, "optimizer": optim_sd}, out / "state.pt")
            _write_progress(out, progress)
    d.barrier()


def _write_progress(out: Path, progress: dict) -> None:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, out / "rng.pt")
    (out / "progress.json").write_text(json.dumps(progress, indent=2))


def find_state(save: Path) -> Path | None:
    """SAVE/state, or the previous state if a crash hit between the two renames of a replacement."""
    for p in (save / STATE_DIR, save / f".{STATE_DIR}.old"):
        if (p / "progress.json").exists():
            return p
    return None


def load_state(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimiser and RNG from `path` on every rank; return the progress record."""
    if _is_deepspeed(model):
        model.load_checkpoint(str(path / "deepspeed"), tag="ds")
    else:
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        set_model_state_dict(model, blob["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "progress.json").read_text())
