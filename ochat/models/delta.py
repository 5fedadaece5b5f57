"""`ochat model make-delta` / `apply-delta`: Vicuna-style weight deltas, delta = target - base per tensor.

A delta directory holds the delta tensors (safetensors shards), the target's config, generation config,
tokenizer and ochat.json, and `ochat_delta.json` (what each tensor looked like in the base and the
target, and a checksum of the base weights, so that applying to the wrong base is an error rather
than a silently broken model).

Rows beyond the base vocabulary (a target that went through `ochat model add-eot`) have no base
counterpart: the delta stores the target's rows there as they are, as FastChat's apply_delta for
Vicuna v0 (vocabulary + pad token) did.

Exactness: target - base rounded to the target's own dtype does not give the target back (Vicuna's
fp16 deltas were approximate). By default the delta is stored one float width up (fp16/bf16 ->
float32, float32 -> float64) and all arithmetic is done in float64, so `apply-delta` reproduces the
target bit for bit; make-delta checks that and reports any value that would not round-trip.
`--dtype float16` gives FastChat-size deltas at FastChat's precision. Deltas made by FastChat (no
`ochat_delta.json`) can be applied too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ochat.errors import OchatError
from ochat.models.checkpoint import Checkpoint, ShardWriter, parse_size
from ochat.models.paths import copy_non_weight_files, read_json, require_model_dir, require_new_out
from ochat.utils.atomic import atomic_dir

DELTA_JSON = "ochat_delta.json"
DELTA_FORMAT = "ochat-delta/1"
WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64,
         torch.float64: torch.float64}
CHUNK_ELEMENTS = 1 << 22
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{_dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}={d};" for n, d in sorted(digests.items())).encode()).hexdigest()


def check_shapes(name: str, base_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    """Same shape, or the target has more rows (a vocabulary grown by add-eot)."""
    if base_shape == target_shape:
        return
    if len(base_shape) == len(target_shape) >= 1 and base_shape[1:] == target_shape[1:] \
            and target_shape[0] > base_shape[0]:
        return
    raise OchatError(f"tensor {name}: base shape {list(base_shape)} vs target {list(target_shape)} "
                     "(only embedding / lm_head rows may grow)")


def combine(x: torch.Tensor, y: torch.Tensor, sign: int, dtype: torch.dtype) -> torch.Tensor:
    """x + sign * y computed in float64 and rounded once to `dtype`; rows of x beyond y's keep x's values.

    Works in blocks of rows so that float64 temporaries stay ~32 MB whatever the tensor's size."""
    if x.dim() == 0:
        return (x.to(torch.float64) + sign * y.to(torch.float64)).to(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    for i in range(0, x.shape[0], step):
        block = x[i:i + step].to(torch.float64, copy=True)  # never write into x
        j = min(i + step, y.shape[0])
        if j > i:
            block[: j - i].add_(y[i:j], alpha=sign)
        out[i:i + step] = block
    return out


def subtract(target: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return combine(target, base, -1, dtype)


def add(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return combine(delta, base, +1, dtype)


def make_delta(base: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto",
               max_shard_size: str | int = "5GB") -> dict:
    base_dir, target_dir = require_model_dir(base, "--base"), require_model_dir(target, "--target")
    out = require_new_out(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise OchatError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    inexact, max_err = 0, 0.0
    with Checkpoint(base_dir, keep_open=False) as B, Checkpoint(target_dir, keep_open=False) as T:
        names = T.names()
        missing = [n for n in names if n not in B.where]
        if missing:
            raise OchatError(f"--base {base}: has no tensor {missing[0]} (the target has {len(missing)} tensors "
                             "the base lacks: not the same architecture)")
        for name in names:  # all shape errors before any work
            check_shapes(name, B.shape(name), T.shape(name))
        tensors, digests = {}, {}
        with atomic_dir(out) as tmp:
            writer = ShardWriter(tmp, max_bytes)
            bar = tqdm(total=len(names), desc="make-delta", unit="tensor", disable=None)  # None: off unless a TTY
            for file in T.files:
                for name in T.names(file):
                    t, b = T.get(name), B.get(name)
                    digests[name] = tensor_digest(name, b)
                    if t.is_floating_point():
                        d = subtract(t, b, WIDER[t.dtype] if dtype == "auto" else DTYPES[dtype])
                        back = add(b, d, t.dtype)
                        wrong = (back != t) & ~(back.isnan() & t.isnan())
                        if wrong.any():
                            inexact += int(wrong.sum())
                            max_err = max(max_err, float((back.double() - t.double()).abs().max()))
                    else:  # integer buffers: nothing to hide, store them as they are
                        d = t
                    tensors[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                                     "base_shape": list(b.shape)}
                    writer.add(name, d)
                    bar.update()
            bar.close()
            files = writer.close()
            copy_non_weight_files(target_dir, tmp)
            manifest = {"format": DELTA_FORMAT, "delta_dtype": dtype, "base_sha256": combined_digest(digests),
                        "round_trip_inexact_values": inexact, "tensors": tensors}
            (tmp / DELTA_JSON).write_text(json.dumps(manifest, indent=1))
    return {"out": out, "tensors": len(names), "files": len(files), "inexact": inexact, "max_err": max_err}


def apply_delta(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, low_memory: bool = False,
                max_shard_size: str | int | None = None) -> dict:
    """base + delta. Default: load the base model whole (any format transformers reads), as FastChat does.
    low_memory: one tensor of the base and of the delta, and one output shard (default 1GB) in memory at a time."""
    base_dir, delta_dir = require_model_dir(base, "--base"), require_model_dir(delta, "--delta")
    out = require_new_out(out)
    max_bytes = parse_size(max_shard_size or ("1GB" if low_memory else "5GB"))
    manifest = _read_manifest(delta_dir)
    config = read_json(delta_dir / "config.json")
    config_dtype = DTYPES.get(config.get("dtype") or config.get("torch_dtype"))  # the target's, for FastChat deltas
    with Checkpoint(delta_dir, keep_open=not low_memory) as D, Checkpoint(base_dir, keep_open=not low_memory) as B:
        names = D.names()
        for name in names:  # every mismatch is reported before any work
            if name not in B.where:
                raise OchatError(f"--base {base}: has no tensor {name} (not the base this delta was made from)")
            have = B.shape(name)
            if manifest is None:  # a FastChat delta: the delta has the target's shapes
                check_shapes(name, have, D.shape(name))
                continue
            if name not in manifest["tensors"]:
                raise OchatError(f"--delta {delta}: tensor {name} is missing from {DELTA_JSON} (a damaged delta)")
            want = tuple(manifest["tensors"][name]["base_shape"])
            if have != want:
                what = "vocab mismatch" if have[1:] == want[1:] and len(have) == len(want) else "shape mismatch"
                raise OchatError(f"--base {base}: {what}: tensor {name} has shape {list(have)}, the delta was made "
                                 f"from a base with {list(want)}")
        if low_memory:
            get_base = B.get
        else:
            state = _load_base_model_state(base_dir)
            lost = [n for n in names if n not in state]
            if lost:
                raise OchatError(f"--base {base}: transformers loads it without tensor {lost[0]}; use --low-memory, "
                                 "which reads the files as they are")
            get_base = state.__getitem__
        digests = {}
        with atomic_dir(out) as tmp:
            writer = ShardWriter(tmp, max_bytes)
            bar = tqdm(total=len(names), desc="apply-delta", unit="tensor", disable=None)  # None: off unless a TTY
            for file in D.files:
                for name in D.names(file):
                    d, b = D.get(name), get_base(name)
                    digests[name] = tensor_digest(name, b)
                    if d.is_floating_point():
                        dtype = DTYPES[manifest["tensors"][name]["dtype"]] if manifest else config_dtype or d.dtype
                        writer.add(name, add(b, d, dtype))
                    else:
                        writer.add(name, d)
                    bar.update()
            bar.close()
            if manifest and combined_digest(digests) != manifest["base_sha256"]:
                raise OchatError(f"--base {base}: its weights differ from the base this delta was made from "
                                 "(checksum mismatch: another model, dtype or version)")
            files = writer.close()
            copy_non_weight_files(delta_dir, tmp, skip=(DELTA_JSON,))
    return {"out": out, "tensors": len(names), "files": len(files)}


def _read_manifest(delta_dir: Path) -> dict | None:
    p = delta_dir / DELTA_JSON
    if not p.is_file():
        return None
    manifest = read_json(p)
    if manifest.get("format") != DELTA_FORMAT:
        raise OchatError(f"{p}: format {manifest.get('format')!r}, expected {DELTA_FORMAT!r}")
    return manifest


def _load_base_model_state(base_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    quiet = not sys.stderr.isatty()  # a progress bar is for people; a log keeps only the summary / the error
    if quiet:
        logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    except Exception as e:  # many kinds; the user needs one line
        raise OchatError(f"--base {base_dir}: cannot load the model: {str(e).splitlines()[0]}") from None
    finally:
        if quiet:
            logging.enable_progress_bar()
    return model.state_dict()
