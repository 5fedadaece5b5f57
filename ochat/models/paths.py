"""Model directories on disk: is this a model dir, where are its weights (no torch import here, so the
CLI reports a bad path at once instead of after seconds of importing torch)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ochat.errors import OchatError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def require_model_dir(path: str | os.PathLike, flag: str) -> Path:
    """A Hugging Face model directory: config.json plus weights."""
    p = Path(path)
    if not p.is_dir():
        raise OchatError(f"{flag} {path}: not a directory (expected a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise OchatError(f"{flag} {path}: not a model directory (no config.json)")
    if not weight_files(p):
        raise OchatError(f"{flag} {path}: no weights (expected *.safetensors or pytorch_model*.bin)")
    return p


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OchatError(f"{path}: not valid JSON ({e})") from None


def require_new_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        raise OchatError(f"--out {out}: already exists (choose a new directory)")
    return out


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model dir, safetensors preferred (as transformers does)."""
    for index, pattern in ((SAFE_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        if (model_dir / index).is_file():
            weight_map = read_json(model_dir / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise OchatError(f"{model_dir / index}: no weight_map")
            return [model_dir / f for f in sorted(set(weight_map.values()))]
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    return []


def is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES)


def copy_non_weight_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Config, generation config, tokenizer, ochat.json: everything of a model dir except its weights."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not is_weight_file(f) and f.name not in skip:
            shutil.copy2(f, dst / f.name)
