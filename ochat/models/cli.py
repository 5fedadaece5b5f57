"""`ochat model ...`: prepare models for a conversation template."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ochat.errors import OchatError
from ochat.models.model_dir import ModelDir
from ochat.models.paths import require_model_dir, require_new_out

# torch / transformers are imported inside each command, after the cheap checks of its arguments:
# a wrong path is reported in a fraction of a second instead of after seconds of imports.
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
    from ochat.models.tiny import make_tiny_model

    path = make_tiny_model(out, tokenizer, model_type, arch=arch, hidden_size=hidden_size, layers=layers,
                           heads=heads, kv_heads=kv_heads, intermediate_size=intermediate_size,
                           max_positions=max_positions, seed=seed)
    console.print(f"wrote tiny {arch} model ({model_type}) to {path}")


@app.command("add-eot")
def add_eot_cmd(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory (with its tokenizer)"),
    out: Path = typer.Option(..., "--out", help="Directory to create"),
    model_type: str = typer.Option(None, "--model-type", help="Default: ochat.json's type, else openchat_3.5"),
    init: str = typer.Option(None, "--init", help="mean | normal (N(0, 0.02)); default: normal for gpt_bigcode, "
                                                  "else mean"),
    seed: int = typer.Option(0, "--seed", help="For --init normal"),
) -> None:
    """Add the model type's special tokens, grow and initialise the embeddings, write chat_template."""
    ModelDir(model, "--model", model_type, require_weights=True)   # a bad path or type fails before torch loads
    require_new_out(out)
    if init not in (None, "mean", "normal"):
        raise OchatError(f"--init {init}: expected mean or normal")
    from ochat.models.tools import add_eot

    r = add_eot(model, out, model_type=model_type, init=init, seed=seed)
    added = ", ".join(f"{t} = {i}" for t, i in zip(r["added"], r["ids"])) or "none (all present)"
    console.print(f"added tokens: {added}; embeddings {r['vocab'][0]} -> {r['vocab'][1]} rows ({r['init']} init); "
                  f"model type {r['model_type']}; wrote {r['out']}")


@app.command("extend-context")
def extend_context_cmd(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory"),
    out: Path = typer.Option(..., "--out", help="Directory to create"),
    max_position_embeddings: int = typer.Option(8192, "--max-position-embeddings"),
    rope_scaling: str = typer.Option("none", "--rope-scaling",
                                     help="none: extrapolate (OpenChat-8192) | linear: position interpolation"),
) -> None:
    """Raise a model's context limit (weights unchanged unless the positions are a learned table)."""
    require_model_dir(model, "--model")
    require_new_out(out)
    if rope_scaling not in ("none", "linear"):
        raise OchatError(f"--rope-scaling {rope_scaling}: expected none or linear")
    from ochat.models.tools import extend_context

    r = extend_context(model, out, max_position_embeddings, rope_scaling=rope_scaling)
    console.print(f"context {r['from']} -> {r['to']} ({rope_scaling}); model type {r['model_type']}; wrote {r['out']}")


@app.command("make-delta")
def make_delta_cmd(
    base: Path = typer.Option(..., "--base", help="The base model directory (e.g. LLaMA)"),
    target: Path = typer.Option(..., "--target", help="The fine-tuned model directory"),
    out: Path = typer.Option(..., "--out", help="Delta directory to create"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (one width up: exact round trip) | float16 | bfloat16 "
                                                      "| float32 | float64"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
) -> None:
    """Write target - base per tensor (Vicuna-style weight delta) with the target's tokenizer and configs."""
    require_model_dir(base, "--base")
    require_model_dir(target, "--target")
    require_new_out(out)
    from ochat.models.delta import make_delta

    r = make_delta(base, target, out, dtype=dtype, max_shard_size=max_shard_size)
    exact = "exact round trip" if not r["inexact"] else f"{r['inexact']} values inexact (max |err| {r['max_err']:.3g})"
    console.print(f"wrote delta of {r['tensors']} tensors in {r['files']} file(s) to {r['out']} ({exact})")


@app.command("apply-delta")
def apply_delta_cmd(
    base: Path = typer.Option(..., "--base", help="The base model directory the delta was made from"),
    delta: Path = typer.Option(..., "--delta", help="Delta directory (ochat make-delta or FastChat)"),
    out: Path = typer.Option(..., "--out", help="Model directory to create"),
    low_memory: bool = typer.Option(False, "--low-memory", help="Work tensor by tensor, shard by shard"),
    max_shard_size: str = typer.Option(None, "--max-shard-size", help="Default 5GB; 1GB with --low-memory "
                                                                       "(an output shard is held in memory)"),
) -> None:
    """Rebuild the target model: base + delta."""
    require_model_dir(base, "--base")
    require_model_dir(delta, "--delta")
    require_new_out(out)
    from ochat.models.delta import apply_delta

    r = apply_delta(base, delta, out, low_memory=low_memory, max_shard_size=max_shard_size)
    console.print(f"wrote {r['tensors']} tensors in {r['files']} file(s) to {r['out']}")
