"""`ochat eval ...`: answers, judge, report, alpaca-export, fewshot, ranking."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from ochat.errors import OchatError

app = typer.Typer(help="Evaluate: model answers, GPT-4-as-judge, reports, few-shot benchmarks.", no_args_is_help=True)
console = Console(stderr=True)


def _questions(questions: str | None, old_bench: str | None) -> str:
    if not (questions or old_bench):
        raise OchatError("--questions FILE is required (the question file; --bench is its old name)")
    return questions or old_bench


@app.command()
def answers(
    questions: Optional[str] = typer.Option(None, "--questions", help="Question file (required): Vicuna ({question_id, text, category}) or MT-bench ({question_id, category, turns}) JSONL."),
    old_bench: Optional[str] = typer.Option(None, "--bench", hidden=True),  # the old name of --questions
    out: str = typer.Option(..., help="Answer file DIR/MODEL.jsonl (FastChat's answer format); resumed if it exists."),
    model: Optional[str] = typer.Option(None, help="Local model directory, served in-process."),
    api_base: Optional[str] = typer.Option(None, help="An OpenAI-compatible endpoint instead (key from OPENAI_API_KEY)."),
    model_name: Optional[str] = typer.Option(None, help="Model name at --api-base (e.g. gpt-3.5-turbo)."),
    model_id: Optional[str] = typer.Option(None, help="model_id written in the answers (default: the file name)."),
    max_tokens: int = typer.Option(1024, min=1, help="Maximum new tokens per turn."),
    parallel: int = typer.Option(8, min=1, help="Concurrent requests."),
    condition: Optional[str] = typer.Option(None, help="C-RLFT condition, e.g. 'GPT4 Correct' (default: the model type's)."),
    temperature_map: Optional[list[str]] = typer.Option(None, help="CATEGORY=T overrides, e.g. 'writing=0.5,*=0' (default: writing/roleplay 0.7, stem/humanities 0.1, rest 0)."),
    retries: int = typer.Option(4, min=1, help="Tries per request."),
    backoff: float = typer.Option(1.0, min=0.0, help="First retry wait in seconds (doubles)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N questions."),
) -> None:
    """Answer a question file with a local model or an OpenAI-compatible endpoint."""
    from ochat.evaluation.answers import run_answers

    s = run_answers(_questions(questions, old_bench), out, model, api_base, model_name, model_id, max_tokens, parallel, condition,
                    temperature_map, retries, backoff, limit)
    _summary(f"answers: {s.answered} new, {s.skipped} already there, {s.failed} failed -> {s.out}", s.failed,
             f"[red]{s.failed} question(s) failed[/]; errors in {s.errors}; run again to retry them")


def _summary(line: str, failed: int, failure: str) -> None:
    """The run's one-line summary; exit 1 (after saying how to retry) when some items failed."""
    console.print(line)
    if failed:
        console.print(failure)
        raise typer.Exit(1)


@app.command()
def judge(
    mode: str = typer.Option(..., help="vicuna | single | pairwise-baseline | pairwise-all"),
    questions: Optional[str] = typer.Option(None, "--questions", help="The question file the answers answer (required)."),
    old_bench: Optional[str] = typer.Option(None, "--bench", hidden=True),  # the old name of --questions
    answers: str = typer.Option(..., help="Directory of answer files MODEL.jsonl."),
    judge_model: str = typer.Option("gpt-4", help="Judge model name."),
    judge_api_base: Optional[str] = typer.Option(None, help="Judge endpoint (default: OpenAI; key from OPENAI_API_KEY)."),
    baseline: Optional[str] = typer.Option(None, help="Baseline model (vicuna, pairwise-baseline)."),
    models: Optional[list[str]] = typer.Option(None, help="Models to judge (default: every answer file)."),
    prompts: Optional[str] = typer.Option(None, help="Judge prompts in FastChat's judge_prompts.jsonl format (default: ochat's)."),
    references: Optional[str] = typer.Option(None, help="Reference answers (answer format) for math/reasoning/coding."),
    out: Optional[str] = typer.Option(None, help="Judgment file (default: ANSWERS/../model_judgment/JUDGE_MODE.jsonl)."),
    parallel: int = typer.Option(8, min=1, help="Concurrent judgments (pairwise ones send both orders at once)."),
    temperature: float = typer.Option(0.0, min=0.0, help="Judge sampling temperature."),
    max_tokens: int = typer.Option(2048, min=1, help="Judge reply length limit."),
    retries: int = typer.Option(4, min=1, help="Tries per judgment (transport errors and unparseable replies)."),
    backoff: float = typer.Option(1.0, min=0.0, help="First retry wait in seconds (doubles)."),
) -> None:
    """Judge answers with GPT-4 (or any OpenAI-compatible judge)."""
    from ochat.evaluation.judge import run_judge
    from ochat.evaluation.report import print_summary

    s = run_judge(mode, _questions(questions, old_bench), answers, judge_model, judge_api_base, baseline, models, prompts, references, out,
                  parallel, temperature, max_tokens, retries, backoff, console)
    if s.judged + s.resumed + s.failed:
        print_summary(s.out)
    _summary(f"judgments: {s.judged} new, {s.resumed} already there, {s.failed} failed -> {s.out}", s.failed,
             f"[red]{s.failed} judgment(s) failed[/] (not scored); run again to retry them")


@app.command()
def report(
    dir: str = typer.Argument(..., help="Bench directory with model_judgment/ (and model_answer/), or a judgment directory."),
    out: Optional[str] = typer.Option(None, help="Report directory (default: DIR/report)."),
    questions: Optional[str] = typer.Option(None, "--questions", help="Question file, to show the questions' text."),
    old_bench: Optional[str] = typer.Option(None, "--bench", hidden=True),  # the old name of --questions
) -> None:
    """Tables in the terminal and Markdown, and a self-contained HTML report with charts."""
    from ochat.evaluation.report import make_report

    paths = make_report(dir, out, questions or old_bench)
    console.print("report: " + ", ".join(str(p) for p in paths))


@app.command("alpaca-export")
def alpaca_export(
    answers: str = typer.Option(..., help="Answer file MODEL.jsonl."),
    questions: Optional[str] = typer.Option(None, "--questions", help="The question file (required; AlpacaEval needs each instruction's text)."),
    old_bench: Optional[str] = typer.Option(None, "--bench", hidden=True),  # the old name of --questions
    out: str = typer.Option(..., help="Output JSON for AlpacaEval."),
    generator: Optional[str] = typer.Option(None, help="Generator name (default: the answers' model_id)."),
) -> None:
    """Convert answers to AlpacaEval's input [{"instruction", "output", "generator"}]."""
    from ochat.evaluation.alpaca_export import export

    n = export(answers, _questions(questions, old_bench), out, generator)
    console.print(f"alpaca-export: {n} rows -> {out}")


def fewshot(
    mc: Optional[list[str]] = typer.Option(None, "--mc", help="MMLU-style JSONL {question, choices, answer}: multiple choice by log-likelihood (repeatable)."),
    gen: Optional[list[str]] = typer.Option(None, "--gen", help="GSM8K-style JSONL {question, answer: '... #### N'}: generation, lm-eval's gsm8k filters (repeatable)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Other lm-eval tasks, comma-separated (YAMLs from --include-path)."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="Directory of lm-eval task YAMLs."),
    model: Optional[str] = typer.Option(None, help="Local model directory, served in-process."),
    api_base: Optional[str] = typer.Option(None, help="A running `ochat serve` (or other OpenAI-compatible server), e.g. http://127.0.0.1:18888/v1."),
    model_name: Optional[str] = typer.Option(None, help="Model name at --api-base."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer lm-eval counts tokens with (default: --model)."),
    tokenized_requests: bool = typer.Option(True, "--tokenized-requests/--text-requests", help="Send log-likelihood prompts as token ids or as text."),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="Few-shot examples per question (default: the task's)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N questions of each task."),
    parallel: int = typer.Option(8, min=1, help="Concurrent requests (batched by the server)."),
    max_tokens: int = typer.Option(256, min=1, help="Maximum new tokens per generated answer."),
    out: Optional[str] = typer.Option(None, help="Scores DIR/fewshot/MODEL.json (read by `ochat eval report DIR`), per-question MODEL.samples.jsonl."),
) -> None:
    """Few-shot benchmarks (MMLU-, GSM8K-style or any lm-eval task) run by lm-evaluation-harness."""
    from ochat.evaluation.fewshot import run_fewshot

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    run_fewshot(mc or [], gen or [], names, include_path, model, api_base, model_name, tokenizer, tokenized_requests,
                num_fewshot, limit, parallel, max_tokens, out, console)


app.command("fewshot")(fewshot)
app.command("bench", hidden=True)(fewshot)  # the old name, for one release


@app.command()
def ranking(
    votes: str = typer.Argument(..., help="Votes file (JSON lines) written by `ochat serve --votes-file`."),
    out: Optional[str] = typer.Option(None, help="Also write the ranking here as JSON."),
    rounds: int = typer.Option(1000, min=0, help="Bootstrap rounds for the confidence intervals (0: none)."),
    confidence: float = typer.Option(0.95, min=0.5, max=0.999, help="Confidence level of the intervals."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Win rates and a Bradley-Terry (Elo-scale) ranking with bootstrap confidence intervals from votes."""
    import json

    from ochat.evaluation.votes import load_votes, print_ranking, ranking as rank_votes
    from ochat.utils.atomic import atomic_write_text

    records, skipped = load_votes(votes)
    rows = rank_votes(records, rounds=rounds, seed=seed, confidence=confidence)
    print_ranking(votes, rows, skipped, confidence, Console())
    if out:
        atomic_write_text(out, json.dumps({"votes": len(records), "skipped": skipped, "confidence": confidence,
                                           "rounds": rounds, "ranking": rows}, indent=2) + "\n")
        console.print(f"ranking: {len(rows)} models from {len(records)} votes -> {out}")
