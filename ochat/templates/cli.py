"""`ochat template ...`: inspect how a model type encodes a conversation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ochat.errors import OchatError
from ochat.models.tokenizers import load_prepared_tokenizer
from ochat.templates.conversation import parse_conversation
from ochat.templates.encoder import ConversationEncoder
from ochat.templates.registry import MODEL_TYPES, get_model_type

app = typer.Typer(help="Conversation templates.", no_args_is_help=True)


@app.command("encode")
def encode(
    model_type: str = typer.Option(..., "--model-type"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="HF tokenizer directory, or 'mistral-common'"),
    input: Path = typer.Option(..., "--input", help="One conversation as JSON (canonical or ShareGPT)"),
    condition: str = typer.Option(None, "--condition", help="C-RLFT condition (overrides the file's)"),
    inference: bool = typer.Option(False, "--inference", help="Append the assistant prefix for generation"),
) -> None:
    """Print {"tokens": [...], "weights": [...]} for one conversation."""
    mt = get_model_type(model_type)
    try:
        raw = json.loads(input.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OchatError(f"--input {input}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OchatError(f"--input {input}: not valid JSON ({e})") from None
    conv = parse_conversation(raw, where=str(input))
    tok, _ = load_prepared_tokenizer(tokenizer, mt)  # as `ochat data pipeline` does
    tokens, weights = ConversationEncoder(mt, tok).encode_one(conv, inference=inference, condition=condition)
    print(json.dumps({"tokens": tokens, "weights": weights}))


@app.command("list")
def list_types() -> None:
    """List the model types."""
    for name, mt in sorted(MODEL_TYPES.items()):
        alias = f" (alias of {mt.name})" if name != mt.name else ""
        print(f"{name}{alias}: context {mt.max_context}; {mt.description}")
