"""Processes and engines: torchrun / accelerate launch / deepspeed set the env; we only pick the engine.

- one process: the plain model;
- N processes: DDP (default) or FSDP2 (`--fsdp`), gloo on CPU and nccl on GPU;
- `--deepspeed zero2|zero3|CONFIG.json`: DeepSpeed ZeRO (imported only then).
We write no parallelism of our own: gradients are averaged by the engine, which is why the loss is
multiplied by the world size (see loss.py: the loss is a sum over the global batch).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ochat.errors import OchatError


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def setup(use_deepspeed: bool = False) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if use_deepspeed:
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if cuda else None)
    return Dist(rank, local_rank, world, device)


def import_deepspeed() -> Any:
    try:
        import deepspeed  # optional: GPU clusters only
    except ImportError:
        raise OchatError("--deepspeed needs the package deepspeed (pip install deepspeed), "
                         "or run without it (DDP/FSDP under torchrun)") from None
    return deepspeed


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: float, device: torch.device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t)


def wrap_ddp_or_fsdp(model: torch.nn.Module, d: Dist, fsdp: bool, bf16: bool) -> torch.nn.Module:
    """The model as the engine runs it. FSDP2 shards each decoder layer, then the root."""
    if d.world_size == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


CONFIGS = Path(__file__).with_name("deepspeed_configs")   # zero2.json, zero3.json


def deepspeed_config(spec: str | os.PathLike) -> dict:
    """`--deepspeed zero2|zero3|PATH` as a config dict."""
    path = CONFIGS / f"{spec}.json" if str(spec) in ("zero2", "zero3") else Path(spec)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OchatError(f"--deepspeed {spec}: expected zero2, zero3 or a readable JSON config ({e})") from None


def deepspeed_initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: str | os.PathLike,
                         grad_accum: int, world_size: int, max_grad_norm: float) -> Any:
    """A DeepSpeed engine over our model and optimiser. The config decides ZeRO stage and bf16; we set the
    batch sizes (one packed row per micro-batch) and the loop's clipping."""
    deepspeed = import_deepspeed()
    config = deepspeed_config(spec)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
                  train_batch_size=grad_accum * world_size, gradient_clipping=max_grad_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def unwrap(model: Any) -> torch.nn.Module:
    """The underlying HF (or peft) model of a DDP / DeepSpeed wrapper."""
    return getattr(model, "module", model)
