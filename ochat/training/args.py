"""Training arguments (the `ochat train` flags, usable from Python as `TrainArgs(...)`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

# `--lr auto`: lr = AUTO_LR_BASE * sqrt(supervised tokens per step / AUTO_LR_REF_TOKENS), i.e. the
# seed's 2e-5 at its global batch of 128 conversations of ~512 supervised tokens each, scaled by the
# square-root rule (Adam's noise scale) for other batch sizes.
AUTO_LR_BASE = 2e-5
AUTO_LR_REF_TOKENS = 128 * 512


@dataclass
class TrainArgs:
    model: Path                          # base model directory (HF format, with ochat.json or --model-type)
    data: str                            # PREFIX of PREFIX.train.parquet / PREFIX.eval.parquet
    save: Path                           # output directory: ep_N/, state/, metrics.jsonl
    model_type: str | None = None        # default: the model's ochat.json
    epochs: int = 5
    batch_max_len: int = 8192            # tokens per packed row (one row per rank per micro-step)
    grad_accum: int = 1                  # packed rows per rank per optimiser step
    lr: float | str = 2e-5               # a number or "auto"
    lr_min_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    max_grad_norm: float = 1.0
    seed: int = 42
    packing_window: int = 4096           # conversations per first-fit-decreasing window
    gradient_checkpointing: bool = False
    save_every: int = 1                  # epochs between ep_N checkpoints (the last epoch is always saved)
    state_every: int = 100               # optimiser steps between resumable-state saves (0: epoch ends only)
    resume: bool = False
    max_steps: int | None = None         # stop early (for smoke tests and benchmarks)
    strict: bool = False                 # error (instead of truncating) on a conversation > batch_max_len
    fsdp: bool = False
    deepspeed: Path | None = None        # a DeepSpeed JSON config: use ZeRO instead of DDP/FSDP
    lora_r: int = 0                      # > 0: train LoRA adapters of this rank (peft)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    merge_lora: bool = False             # save merged plain HF weights instead of adapters
    report_to: str = "none"              # none | tensorboard | wandb
    progress: bool = True
    overwrite: bool = False              # allow an existing non-empty SAVE without --resume

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
