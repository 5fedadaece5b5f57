"""`ochat train`: padding-free packed C-RLFT fine-tuning (one process, or N under torchrun / deepspeed).

Its options are the fields of `TrainArgs` (training/args.py), built by `ochat.utils.config_cli`.
"""

from __future__ import annotations

from ochat.training.args import TrainArgs
from ochat.utils.config_cli import typer_command


def run(args: TrainArgs) -> None:
    """Fine-tune a causal LM on pre-tokenized Parquet with padding-free packing and the C-RLFT loss."""
    from ochat.training.train import train as train_loop

    train_loop(args)


train = typer_command(TrainArgs, run)
