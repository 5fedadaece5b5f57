"""Checkpoints. Every write goes to a hidden temporary directory that is fsynced and renamed into place at
the end, so a crash or a full disk never leaves a half-written checkpoint and never harms the previous one.

- `SAVE/ep_N/`: a Hugging Face model directory (safetensors, tokenizer with chat_template,
  generation_config.json, ochat.json with the model type and the training arguments), loadable by
  `AutoModelForCausalLM.from_pretrained` and `ochat serve`. N counts epochs from 0, as in the seed.
- `SAVE/best/`: the same, for the lowest eval loss (`--save-best`).
- `SAVE/state/`: what `--resume` needs (full model and optimiser state, progress, RNG, and the identity
  of the run: `--resume` refuses to continue a state written by another run).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError

from ochat.errors import OchatError
from ochat.models.model_dir import read_ochat_json, write_ochat_files
from ochat.models.tokenizers import load_tokenizer, save_tokenizer
from ochat.templates.registry import get_model_type
from ochat.training.distributed import Dist, Engine
from ochat.utils.atomic import atomic_dir, clean_stale, commit_dir

STATE_DIR = "state"
BEST_DIR = "best"
# A full disk: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def epoch_dir(save: Path, epoch: int) -> Path:
    return save / f"ep_{epoch}"


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


def save_model(path: Path, engine: Engine, base_model: Path, model_type: str, d: Dist, training_args: dict,
               merge_lora: bool, epoch: int) -> Path | None:
    """Write `path` (rank 0) as a HF model directory. Every rank must call it."""
    state = engine.full_model_state()
    if not d.is_main:
        d.barrier()
        return None
    hf_model = engine.hf_model
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
        mt = get_model_type(model_type)
        save_tokenizer(tokenizer, tmp, mt)  # with ochat's chat_template for the type, checked against the encoder
        base_meta = read_ochat_json(base_model)
        extra = {k: v for k, v in base_meta.items() if k not in ("model_type", "ochat_version")}
        extra.update(base_model=str(base_model), epoch=epoch, training=training_args)
        write_ochat_files(tmp, mt, tokenizer, extra)
        if (base_model / "generation_config.json").exists():
            shutil.copy(base_model / "generation_config.json", tmp / "generation_config.json")
    d.barrier()
    return path


def save_state(save: Path, engine: Engine, progress: dict, d: Dist) -> None:
    """Atomically replace SAVE/state with the current training state. Every rank must call it: the engine
    may write from every rank (DeepSpeed's shards), into a temporary directory all ranks know."""
    path, tmp = save / STATE_DIR, save / f".{STATE_DIR}.allranks.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    try:
        with write_guard(path):
            engine.save_state(tmp, d)
            d.barrier()
            if d.is_main:
                _write_progress(tmp, progress)
                commit_dir(tmp, path, overwrite=True)
    finally:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()


def _write_progress(out: Path, progress: dict) -> None:
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {"python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, out / "rng.pt")
    (out / "progress.json").write_text(json.dumps(progress, indent=2))


def find_state(save: Path) -> Path | None:
    return save / STATE_DIR if (save / STATE_DIR / "progress.json").exists() else None


def read_progress(path: Path) -> dict:
    return json.loads((path / "progress.json").read_text())


def load_state(path: Path, engine: Engine) -> dict:
    """Restore model, optimiser and RNG from `path` on every rank (tensors only: weights_only loading);
    return the progress record."""
    engine.load_state(path)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(int(x) for x in mt_state), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_progress(path)


def check_same_run(state: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a state written by a run with another identity (data, model, seed, batch ...)."""
    differ = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in current.items() if saved.get(k) != v]
    if differ:
        raise OchatError(f"--resume: {state} is from another run ({'; '.join(differ)}); resume with the same "
                         f"settings, or pass --overwrite to start afresh, or choose a new --save")


def prepare_save_dir(save: Path, resume: bool, overwrite: bool, d: Dist) -> list[str]:
    """Refuse to mix runs (every rank), then on rank 0 clean the temporaries of a killed run and, on
    --overwrite, remove the old run's checkpoints, state and metrics. Returns what was done."""
    ours = [p for p in save.iterdir() if p.name.startswith("ep_") or p.name in (STATE_DIR, BEST_DIR)] \
        if save.is_dir() else []
    if ours and not (resume or overwrite):
        raise OchatError(f"--save {save}: already holds checkpoints (pass --resume to continue that run, "
                         f"or --overwrite, or choose a new directory)")
    done: list[str] = []
    if d.is_main and save.is_dir():
        done = clean_stale(save)
        if overwrite and not resume:
            for p in ours + [save / "metrics.jsonl", save / "tensorboard"]:
                if p.exists():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    done.append(f"--overwrite: removed {p}")
    d.barrier()
    return done
