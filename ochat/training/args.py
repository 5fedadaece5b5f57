"""Training arguments: the `ochat train` options (built from these fields), usable from Python as `TrainArgs(...)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ochat.errors import OchatError
from ochat.utils.config_cli import arg

# `--lr auto`: lr = AUTO_LR_BASE * sqrt(supervised tokens per step / AUTO_LR_REF_TOKENS), i.e. the
# seed's 2e-5 at its global batch of 128 conversations of ~512 supervised tokens each, scaled by the
# square-root rule (Adam's noise scale) for other batch sizes.
AUTO_LR_BASE = 2e-5
AUTO_LR_REF_TOKENS = 128 * 512


def parse_lr(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        lr = float(value)
    except ValueError:
        raise OchatError(f"--lr {value}: expected a number (e.g. 2e-5) or 'auto'") from None
    if not lr > 0:
        raise OchatError(f"--lr {value}: must be > 0")
    return lr


@dataclass
class TrainArgs:
    """Fine-tune a causal LM on pre-tokenized Parquet with padding-free packing and the C-RLFT loss."""

    model: Path = arg(help="Base model directory (Hugging Face format, with ochat.json or --model-type)")
    data: str = arg(help="PREFIX of PREFIX.train.parquet / PREFIX.eval.parquet")
    save: Path = arg(help="Output directory (ep_N/, state/, metrics.jsonl)")
    model_type: str | None = arg(None, help="Conversation template (default: the model's ochat.json)")
    epochs: int = arg(5, min=1, help="Passes over the training split")
    batch_max_len: int = arg(8192, min=2, help="Tokens per packed row (one row per rank per micro-step)")
    grad_accum: int = arg(1, min=1, help="Packed rows per rank per optimiser step")
    lr: float | str = arg(2e-5, parser=parse_lr, help="Peak learning rate, or 'auto' (square-root rule on "
                                                      "supervised tokens per step)")
    lr_min_ratio: float = arg(0.1, min=0, max=1, help="Cosine floor as a fraction of the peak lr")
    warmup_ratio: float = arg(0.03, min=0, max=1, help="Fraction of the steps with linear warm-up")
    weight_decay: float = arg(0.0, min=0, help="AdamW weight decay (not on norms and biases)")
    beta1: float = arg(0.9, help="AdamW beta1")
    beta2: float = arg(0.95, help="AdamW beta2")
    eps: float = arg(1e-5, help="AdamW epsilon")
    max_grad_norm: float = arg(1.0, min=0, help="Gradient clipping (every engine, DeepSpeed included)")
    seed: int = arg(42, help="Seed of the initial RNG and the per-epoch step order")
    packing_window: int = arg(4096, min=1, help="Conversations per first-fit-decreasing window")
    gradient_checkpointing: bool = arg(False, help="Recompute activations in the backward pass")
    ce_chunk: int = arg(4096, min=1, help="Supervised positions per lm-head + cross-entropy chunk "
                                          "(bounds the logits' memory)")
    eval_every: int = arg(0, min=0, help="Optimiser steps between eval-loss passes (0: at epoch ends only)")
    save_best: bool = arg(False, help="Keep the checkpoint of the lowest eval loss as SAVE/best")
    early_stop_patience: int = arg(0, min=0, help="Stop after this many evaluations without a better eval "
                                                  "loss (0: never)")
    save_every: int = arg(1, min=1, help="Epochs between SAVE/ep_N checkpoints (the last epoch is always saved)")
    state_every: int = arg(100, min=0, help="Optimiser steps between resumable-state saves (0: epoch ends only)")
    resume: bool = arg(False, help="Continue the same run from SAVE/state (refused if anything else differs)")
    max_steps: int | None = arg(None, min=1, help="Stop after this many optimiser steps")
    strict: bool = arg(False, help="Refuse (instead of truncating) conversations longer than --batch-max-len")
    fsdp: bool = arg(False, help="FSDP2 instead of DDP under torchrun")
    deepspeed: str | None = arg(None, help="DeepSpeed ZeRO: zero2, zero3 or a JSON config PATH "
                                           "(run under the deepspeed launcher)")
    lora_r: int = arg(0, min=0, help="Train LoRA adapters of this rank (peft)")
    lora_alpha: int = arg(16, help="LoRA alpha")
    lora_dropout: float = arg(0.0, min=0, max=1, help="LoRA dropout")
    merge_lora: bool = arg(False, help="Save merged plain HF weights instead of adapters")
    report_to: Literal["none", "tensorboard", "wandb"] = arg("none", help="Also log to TensorBoard or W&B")
    progress: bool = arg(True, help="Show a progress bar")
    overwrite: bool = arg(False, help="Start afresh in a --save directory that holds a run (its old "
                                      "checkpoints and state are removed)")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
