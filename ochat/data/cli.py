"""`ochat data ...`: each pipeline step on its own (canonical JSONL in and out), and all of them chained."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ochat.data import pipeline
from ochat.data.clean import DEFAULT_BLOCKED_WORDS
from ochat.data.report import render
from ochat.data.sources import MB, Limits
from ochat.errors import OchatError

app = typer.Typer(help="Data: clean, filter, label (C-RLFT), fit to context, split and pre-tokenize conversations.",
                  no_args_is_help=True)

INPUTS = typer.Argument(..., help="ShareGPT pages (.html, or a folder of them), ShareGPT JSON dumps, ochat JSONL")
TOKENIZER_HELP = "HF tokenizer directory (e.g. a model made by `ochat model tiny`), or 'mistral-common'"
CONDITION_MAP_HELP = ("C-RLFT labels per source model: 'GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1' (LABEL=CONDITION[:WEIGHT]), "
                      "JSON {\"GPT-4\": {\"condition\": \"GPT4\", \"weight\": 1.0}}, or a JSON file; "
                      "'*' matches any other label. Replaces --models")
MODELS_HELP = "Model labels to keep, comma-separated ('GPT-4' matches 'Model: GPT-4', 'gpt4'...); 'any' keeps all"
FIT_HELP = "truncate (OpenChat v1) or split at turn boundaries (Vicuna); default: the model type's"


def _blocked(words: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in words.split(",") if w.strip())


MAX_RECORD = typer.Option(16.0, "--max-record-mb", min=0.001,
                          help="A page file, JSON dump element or JSONL line larger than this is dropped, unread")
MAX_MESSAGE = typer.Option(1_000_000, "--max-message-chars", min=1,
                           help="A conversation with a longer message is dropped, unconverted")


def _limits(max_record_mb: float, max_message_chars: int) -> Limits:
    return Limits(max_record_bytes=int(max_record_mb * MB), max_message_chars=max_message_chars)


@app.command("pipeline")
def pipeline_cmd(
    inputs: List[Path] = INPUTS,
    out: Path = typer.Option(..., "--out", help="Output folder"),
    model_type: str = typer.Option(..., "--model-type"),
    tokenizer: str = typer.Option(..., "--tokenizer", help=TOKENIZER_HELP),
    models: str = typer.Option("GPT-4", "--models", help=MODELS_HELP),
    condition_map: Optional[str] = typer.Option(None, "--condition-map", help=CONDITION_MAP_HELP),
    blocked_words: str = typer.Option(",".join(DEFAULT_BLOCKED_WORDS), "--blocked-words",
                                      help="Comma-separated, case-insensitive; '' for none"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop exact duplicates (sha256 of normalised text)"),
    fit: Optional[str] = typer.Option(None, "--fit", help=FIT_HELP),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Default: the model type's context"),
    eval_ratio: float = typer.Option(0.01, "--eval-ratio"),
    seed: int = typer.Option(42, "--seed"),
    legacy_json: bool = typer.Option(False, "--legacy-json", help="Also write the v1 MODEL_TYPE.{train,eval}.json layout"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes (default: all cores)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    max_record_mb: float = MAX_RECORD,
    max_message_chars: int = MAX_MESSAGE,
) -> None:
    """All steps: clean -> filter/label -> split -> fit -> tokenize, into OUT/MODEL_TYPE.{train,eval}.parquet."""
    render(pipeline.run_pipeline(inputs, out, model_type, tokenizer, condition_map=condition_map, models=models,
                                 blocked_words=_blocked(blocked_words), dedup=dedup, fit_mode=fit,
                                 max_context=max_context, eval_ratio=eval_ratio, seed=seed, legacy_json=legacy_json,
                                 workers=workers, progress=progress, limits=_limits(max_record_mb, max_message_chars)))


@app.command("clean")
def clean_cmd(
    inputs: List[Path] = INPUTS,
    out: Path = typer.Option(..., "--out", help="Canonical JSONL to write"),
    blocked_words: str = typer.Option(",".join(DEFAULT_BLOCKED_WORDS), "--blocked-words"),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    max_record_mb: float = MAX_RECORD,
    max_message_chars: int = MAX_MESSAGE,
) -> None:
    """HTML -> Markdown, ChatGPT artefacts, format checks, blocked words, exact dedup."""
    render(pipeline.run_clean(inputs, out, _blocked(blocked_words), dedup, workers, progress,
                              _limits(max_record_mb, max_message_chars)))


@app.command("filter")
def filter_cmd(
    inputs: List[Path] = typer.Argument(..., help="Canonical JSONL (from `ochat data clean`)"),
    out: Path = typer.Option(..., "--out"),
    models: str = typer.Option("GPT-4", "--models", help=MODELS_HELP),
    condition_map: Optional[str] = typer.Option(None, "--condition-map", help=CONDITION_MAP_HELP),
) -> None:
    """Keep conversations by model label, or label them with a C-RLFT condition and weight."""
    render(pipeline.run_filter(inputs, out, models, condition_map))


@app.command("fit")
def fit_cmd(
    inputs: List[Path] = typer.Argument(..., help="Canonical JSONL"),
    out: Path = typer.Option(..., "--out"),
    model_type: str = typer.Option(..., "--model-type"),
    tokenizer: str = typer.Option(..., "--tokenizer", help=TOKENIZER_HELP),
    fit: Optional[str] = typer.Option(None, "--fit", help=FIT_HELP),
    max_context: Optional[int] = typer.Option(None, "--max-context"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Truncate or split conversations to the model type's context."""
    render(pipeline.run_fit(inputs, out, model_type, tokenizer, fit, max_context, workers, progress))


@app.command("split")
def split_cmd(
    inputs: List[Path] = typer.Argument(..., help="Canonical JSONL"),
    out: Path = typer.Option(..., "--out", help="Prefix: writes PREFIX.train.jsonl and PREFIX.eval.jsonl"),
    eval_ratio: float = typer.Option(0.01, "--eval-ratio"),
    seed: int = typer.Option(42, "--seed"),
) -> None:
    """Deterministic train/eval split (pieces of one conversation stay together)."""
    render(pipeline.run_split(inputs, out, eval_ratio, seed))


@app.command("tokenize")
def tokenize_cmd(
    train: Path = typer.Option(..., "--train", help="Canonical JSONL of the training split"),
    eval: Optional[Path] = typer.Option(None, "--eval", help="Canonical JSONL of the eval split"),
    out: Path = typer.Option(..., "--out", help="Output folder"),
    model_type: str = typer.Option(..., "--model-type"),
    tokenizer: str = typer.Option(..., "--tokenizer", help=TOKENIZER_HELP),
    fit: Optional[str] = typer.Option(None, "--fit", help=FIT_HELP),
    max_context: Optional[int] = typer.Option(None, "--max-context"),
    legacy_json: bool = typer.Option(False, "--legacy-json"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Pre-tokenize into OUT/MODEL_TYPE.{train,eval}.parquet and .text.jsonl."""
    render(pipeline.run_tokenize(train, eval, out, model_type, tokenizer, fit, max_context, legacy_json, workers,
                                 progress))


SYNTH_KINDS = {  # kind -> (what --out is, default --n)
    "pages": ("a folder of ShareGPT pages (ChatGPT HTML, realistic length mix)", 1000),
    "quickstart": ("the quickstart corpus folder: pages, a JSON dump, held-out test.jsonl", 6000),
    "texts": ("a .text.jsonl file shaped like the pipeline's, for `ochat viz map` at scale", 10000),
}


@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., "--out", help="Where to write (a folder, or the .text.jsonl file for texts)"),
    kind: str = typer.Option("pages", "--kind", help="; ".join(f"{k}: {v[0]}" for k, v in SYNTH_KINDS.items())),
    n: Optional[int] = typer.Option(None, "--n", "--pages", help="Pages / conversations / lines (default per kind)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write synthetic data (nothing is downloaded): ShareGPT pages, the quickstart corpus, or viz texts."""
    if kind not in SYNTH_KINDS:
        raise OchatError(f"--kind: expected one of {', '.join(SYNTH_KINDS)}, got {kind!r}")
    n = SYNTH_KINDS[kind][1] if n is None else n
    if kind == "pages":
        from ochat.synthetic.sharegpt_pages import write_pages

        write_pages(out, n, seed)
    elif kind == "quickstart":
        from ochat.synthetic.quickstart_corpus import CorpusConfig, write_quickstart_corpus

        write_quickstart_corpus(out, CorpusConfig(conversations=n, seed=seed))
    else:
        from ochat.synthetic.texts import write_texts

        write_texts(out, n, seed)
    print(f"wrote {n} {'pages' if kind == 'pages' else 'conversations'} ({kind}) to {out}")
