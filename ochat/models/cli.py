"""`ochat model ...`: prepare models for a conversation template."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ochat.models.tiny import make_tiny_model

app = typer.Typer(help="Prepare models: tiny test models, end-of-turn tokens, context, deltas.", no_args_is_help=True)
console = Console(stderr=True)


@app.command("tiny")
def tiny(
    out: Path = typer.Option(..., "--out", help="Directory to create"),
    tokenizer: str = typer.Option("mistral-common", help="HF tokenizer directory, or 'mistral-common'"),
    model_type: str = typer.Option("openchat_3.5", "--model-type"),
    arch: str = typer.Option("mistral", help="llama | mistral | gpt_bigcode"),
    hidden_size: int = typer.Option(64, "--hidden-size"),
    layers: int = typer.Option(2, "--layers"),
    heads: int = typer.Option(4, "--heads"),
    kv_heads: int = typer.Option(None, "--kv-heads"),
    intermediate_size: int = typer.Option(None, "--intermediate-size"),
    max_positions: int = typer.Option(None, "--max-positions", help="Default: the model type's context"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Create a randomly initialised small model with its tokenizer, chat_template and ochat.json."""
    path = make_tiny_model(out, tokenizer, model_type, arch=arch, hidden_size=hidden_size, layers=layers,
                           heads=heads, kv_heads=kv_heads, intermediate_size=intermediate_size,
                           max_positions=max_positions, seed=seed)
    console.print(f"wrote tiny {arch} model ({model_type}) to {path}")
