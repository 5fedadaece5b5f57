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
    """List the model types and their layouts."""
    for name, mt in sorted(MODEL_TYPES.items()):
        if name != mt.name:
            print(f"{name}: alias of {mt.name}")
            continue
        generation = mt.role_prefix("assistant", mt.inference_condition)
        print(f"{name}: context {mt.max_context}; {mt.description}\n    {mt.layout_text()!r} then {generation!r}")


@app.command("check")
def check(
    model: Path = typer.Option(..., "--model", help="Model directory (with its tokenizer and chat_template)"),
    model_type: str = typer.Option(None, "--model-type", help="Default: the model's ochat.json"),
) -> None:
    """Does the directory's chat_template give ochat's encoder ids? Probe conversations: single turn,
    multi-turn, system, each condition, empty contents, contents starting with a space or a newline."""
    from ochat.models.model_dir import ModelDir
    from ochat.templates.chat_template import probe_results

    model_dir = ModelDir(model, "--model", model_type)
    mt, tok = model_dir.model_type, model_dir.tokenizer
    if not tok.chat_template:
        print(f"{model}: no chat_template to check")
        raise typer.Exit(1)
    results = probe_results(mt, tok)
    for probe, diff in results:
        print(f"{'agree' if diff is None else 'DIFFER'}  {probe.name}" + ("" if diff is None else f": {diff}"))
    bad = sum(d is not None for _, d in results)
    print(f"{model}: {mt.name}: chat_template and encoder " + (f"differ on {bad} of {len(results)} probes" if bad
                                                                 else f"agree on all {len(results)} probes"))
    if bad:
        raise typer.Exit(1)
