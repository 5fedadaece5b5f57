"""`ochat train`: padding-free packed C-RLFT fine-tuning (one process, or N under torchrun / deepspeed)."""

from __future__ import annotations

from pathlib import Path

import typer

from ochat.errors import OchatError
from ochat.training.args import TrainArgs


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


def train(
    model: Path = typer.Option(..., "--model", help="Base model directory (Hugging Face format)"),
    data: str = typer.Option(..., "--data", help="PREFIX of PREFIX.train.parquet / PREFIX.eval.parquet"),
    save: Path = typer.Option(..., "--save", help="Output directory (ep_N/, state/, metrics.jsonl)"),
    model_type: str = typer.Option(None, "--model-type", help="Default: the model's ochat.json"),
    epochs: int = typer.Option(5, "--epochs", min=1),
    batch_max_len: int = typer.Option(8192, "--batch-max-len", min=2, help="Tokens per packed row (per rank, per micro-step)"),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Packed rows per rank per optimiser step"),
    lr: str = typer.Option("2e-5", "--lr", help="Peak learning rate, or 'auto' (square-root rule on supervised tokens/step)"),
    lr_min_ratio: float = typer.Option(0.1, "--lr-min-ratio", help="Cosine floor as a fraction of the peak lr"),
    warmup_ratio: float = typer.Option(0.03, "--warmup-ratio"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    beta1: float = typer.Option(0.9, "--beta1"),
    beta2: float = typer.Option(0.95, "--beta2"),
    eps: float = typer.Option(1e-5, "--eps"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    seed: int = typer.Option(42, "--seed"),
    packing_window: int = typer.Option(4096, "--packing-window", help="Conversations per first-fit-decreasing window"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    save_every: int = typer.Option(1, "--save-every", min=1, help="Epochs between SAVE/ep_N checkpoints"),
    state_every: int = typer.Option(100, "--state-every", min=0, help="Steps between resumable-state saves"),
    resume: bool = typer.Option(False, "--resume", help="Continue from SAVE/state after a crash"),
    max_steps: int = typer.Option(None, "--max-steps", min=1),
    strict: bool = typer.Option(False, "--strict", help="Refuse conversations longer than --batch-max-len"),
    fsdp: bool = typer.Option(False, "--fsdp", help="FSDP2 instead of DDP when running under torchrun"),
    deepspeed: Path = typer.Option(None, "--deepspeed", help="DeepSpeed JSON config (ZeRO-2/3)"),
    lora_r: int = typer.Option(0, "--lora-r", min=0, help="Train LoRA adapters of this rank (peft)"),
    lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout"),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Save merged plain HF weights"),
    report_to: str = typer.Option("none", "--report-to", help="none | tensorboard | wandb"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse a --save directory that holds checkpoints"),
) -> None:
    """Fine-tune a causal LM on pre-tokenized Parquet with padding-free packing and the C-RLFT loss."""
    from ochat.training.train import train as run

    args = TrainArgs(model=model, data=data, save=save, model_type=model_type, epochs=epochs,
                     batch_max_len=batch_max_len, grad_accum=grad_accum, lr=parse_lr(lr), lr_min_ratio=lr_min_ratio,
                     warmup_ratio=warmup_ratio, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                     max_grad_norm=max_grad_norm, seed=seed, packing_window=packing_window,
                     gradient_checkpointing=gradient_checkpointing, save_every=save_every, state_every=state_every,
                     resume=resume, max_steps=max_steps, strict=strict, fsdp=fsdp, deepspeed=deepspeed,
                     lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_lora=merge_lora,
                     report_to=report_to, progress=progress, overwrite=overwrite)
    run(args)
