"""Processes and engines: torchrun / accelerate launch / deepspeed set the env; we only pick the engine.

- one process: the plain model;
- N processes: DDP (default) or FSDP2 (`--fsdp`), gloo on CPU and nccl on GPU;
- `--deepspeed zero2|zero3|CONFIG.json`: DeepSpeed ZeRO (imported only then).
We write no parallelism of our own. The training loop sees one small interface, `Engine` (micro-step,
backward, step, state), with two implementations: `TorchEngine` (plain / DDP / FSDP2) and
`DeepSpeedEngine`. Gradients are averaged by the engine, which is why the loss is multiplied by
`Engine.grad_scale` (see loss.py: the loss is a sum over the global batch).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ochat.errors import OchatError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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
        if not cuda:
            # DeepSpeed's CPU accelerator would JIT-compile its shared-memory allreduce (a C++ extension:
            # minutes of g++) in every fresh environment; gloo's allreduce does for CPU runs.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
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


class Engine:
    """What the training loop needs from an engine; `model` is what the forward pass calls."""

    model: Any
    optimizer: torch.optim.Optimizer
    grad_scale: float   # multiply the loss by it (the engine averages gradients, we want their sum)

    def micro_step(self, last: bool) -> ContextManager:
        """Around one micro-batch's forward and backward; gradients are synchronised on the `last` one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, max_grad_norm: float) -> float:
        """Clip to `max_grad_norm`, update the weights, clear the gradients; return the gradient norm."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying HF (or peft) model."""
        return unwrap(self.model)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (a collective under FSDP / ZeRO-3: call on every rank)."""
        raise NotImplementedError

    def save_state(self, out: Path, d: Dist) -> None:
        """Write model and optimiser state into the directory `out` (every rank calls it)."""
        raise NotImplementedError

    def load_state(self, path: Path) -> None:
        raise NotImplementedError


class TorchEngine(Engine):
    """The plain model, DDP or FSDP2; our own clipping and optimiser step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int):
        self.model, self.optimizer, self.grad_scale = model, optimizer, float(world_size)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def micro_step(self, last: bool) -> ContextManager:
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last one only
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=FULL)

    def save_state(self, out: Path, d: Dist) -> None:
        model_sd = get_model_state_dict(self.model, options=FULL)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
        if d.is_main:
            torch.save({"model": model_sd, "optimizer": optim_sd}, out / "state.pt")

    def load_state(self, path: Path) -> None:
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        set_model_state_dict(self.model, blob["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(self.model, self.optimizer, blob["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine: it clips (the config's gradient_clipping, set from --max-grad-norm), steps at
    the accumulation boundary and averages over micro-steps too."""

    def __init__(self, engine: Any, grad_accum: int, world_size: int):
        self.model, self.optimizer, self.grad_scale = engine, engine.optimizer, float(world_size * grad_accum)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # DeepSpeed counts micro-steps; the weights move only at the boundary

    def step(self, max_grad_norm: float) -> float:
        return float(self.model.get_global_grad_norm() or 0.0)

    def full_model_state(self) -> dict[str, torch.Tensor]:
        if self.model.zero_optimization_stage() == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}

    def save_state(self, out: Path, d: Dist) -> None:
        self.model.save_checkpoint(str(out / "deepspeed"), tag="ds")

    def load_state(self, path: Path) -> None:
        self.model.load_checkpoint(str(path / "deepspeed"), tag="ds")


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


def make_engine(model: torch.nn.Module, make_optimizer: Any, d: Dist, grad_accum: int, max_grad_norm: float,
                fsdp: bool = False, deepspeed_spec: str | None = None) -> Engine:
    """Wrap `model` for the chosen engine; `make_optimizer(model)` builds the optimiser over the wrapped
    (for FSDP: sharded) parameters."""
    if deepspeed_spec is None:
        # After wrapping: FSDP replaces the parameters by sharded ones, the optimiser must see those.
        wrapped = wrap_ddp_or_fsdp(model, d, fsdp, bf16=d.device.type == "cuda")
        return TorchEngine(wrapped, make_optimizer(wrapped), d.world_size)
    config = deepspeed_config(deepspeed_spec)
    if d.device.type != "cuda":
        config.pop("bf16", None)  # DeepSpeed's CPU accelerator: fp32 (bf16 ZeRO needs a GPU kernel set)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
                  train_batch_size=grad_accum * d.world_size, gradient_clipping=max_grad_norm)
    engine, _, _, _ = import_deepspeed().initialize(model=model, optimizer=make_optimizer(model), config=config)
    return DeepSpeedEngine(engine, grad_accum, d.world_size)


def unwrap(model: Any) -> torch.nn.Module:
    """The underlying HF (or peft) model of a DDP / DeepSpeed wrapper."""
    return getattr(model, "module", model)
