"""`ochat bench crlft`: the OpenChat paper's claim at toy scale, on the quickstart's synthetic tasks.

One mixed-quality corpus (expert "GPT-4" always right, novice "GPT-3.5" often and systematically
wrong), three ways to train the same tiny model for the same number of steps:

- SFT (expert only): the GPT-4 conversations alone (the OpenChat v1 recipe: filter, then fine-tune);
- SFT (mixed): every conversation, one condition, weight 1 (plain fine-tuning on everything);
- C-RLFT (mixed): every conversation, each source with its own condition and class weight
  (GPT-4 -> "GPT4 Correct" 1.0, GPT-3.5 -> "GPT3" 0.1), answered with the expert's condition.

Held-out exact-match accuracy (greedy) over several seeds (model init and data order), mean and
standard deviation. The paper expects C-RLFT (mixed) > SFT (mixed).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

METHODS = [("sft_expert", "SFT (expert only)"), ("sft_mixed", "SFT (mixed)"), ("crlft", "C-RLFT (mixed)")]


def bench_crlft(
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated training seeds"),
    steps: int = typer.Option(300, "--steps", min=1, help="Training steps per run (the same for every method)"),
    conversations: int = typer.Option(6000, "--conversations", min=10, help="Training conversations in the corpus"),
    test_questions: int = typer.Option(90, "--test-questions", min=3, help="Held-out questions"),
    hidden_size: int = typer.Option(128, "--hidden-size", min=16),
    layers: int = typer.Option(2, "--layers", min=1),
    batch_max_len: int = typer.Option(1024, "--batch-max-len", min=64),
    lr: float = typer.Option(3e-3, "--lr"),
    corpus_seed: int = typer.Option(0, "--corpus-seed", help="Seed of the synthetic corpus (shared by all runs)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Work directory (default: a temporary one, deleted)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the figures as JSON"),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Progress bars of each run"),
) -> None:
    """Held-out exact match of SFT (expert only), SFT (mixed) and C-RLFT (mixed) over seeds."""
    import shutil

    from ochat.quickstart.accuracy import exact_match
    from ochat.quickstart.stages import (EXPERT_CONDITION, QuickstartConfig, run_data, run_model, run_train, say)
    from ochat.synthetic.quickstart_corpus import CorpusConfig, read_test, write_quickstart_corpus

    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    work = out or Path(tempfile.mkdtemp(prefix="ochat-bench-crlft-"))
    t_start = time.perf_counter()
    corpus_cfg = CorpusConfig(conversations=conversations, test_questions=test_questions, seed=corpus_seed)
    base = QuickstartConfig(out=work, seed=corpus_seed, corpus=corpus_cfg, hidden_size=hidden_size, layers=layers,
                            steps=steps, batch_max_len=batch_max_len, lr=lr, progress=progress)
    results: dict = {"command": "ochat bench crlft", "seeds": seed_list, "steps": steps, "conversations": conversations,
                     "test_questions": test_questions, "hidden_size": hidden_size, "layers": layers,
                     "batch_max_len": batch_max_len, "lr": lr, "corpus_seed": corpus_seed,
                     "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), loadavg {os.getloadavg()[0]:.1f} at start",
                     "runs": []}
    try:
        summary = write_quickstart_corpus(work / "corpus", corpus_cfg, overwrite=True)
        results["corpus"] = {k: summary[k] for k in ("expert", "novice", "answers", "wrong_answers")}
        say(f"corpus: {summary['expert']} expert + {summary['novice']} novice conversations, "
            f"{summary['wrong_answers']}/{summary['answers']} answers wrong; {summary['test_questions']} held-out questions")
        questions = read_test(work / "corpus" / "test.jsonl")
        prefixes = {}
        for method, _ in METHODS:
            prefixes[method] = Path(run_data(base, method, out=work / f"data-{method}")["prefix"])
        for seed in seed_list:
            cfg = QuickstartConfig(**{**base.__dict__, "seed": seed, "out": work / f"seed{seed}"})
            model_dir = Path(run_model(cfg)["dir"])
            for method, label in reversed(METHODS):  # the paper's comparison first, if the run is cut short
                t0 = time.perf_counter()
                ckpt = Path(run_train(cfg, model_dir, prefixes[method], cfg.out / f"train-{method}")["checkpoint"])
                train_s = time.perf_counter() - t0
                acc = exact_match(ckpt, questions, EXPERT_CONDITION, progress=False)
                run = {"method": method, "seed": seed, "accuracy": acc["accuracy"], "per_task": acc["per_task"],
                       "train_seconds": round(train_s, 1)}
                results["runs"].append(run)
                if json_out:  # partial results survive an interrupted benchmark
                    json_out.write_text(json.dumps(results, indent=2) + "\n")
                say(f"seed {seed} {label}: {acc['accuracy']:.1%} ({', '.join(f'{t} {v:.0%}' for t, v in acc['per_task'].items())}) "
                    f"in {train_s:.0f}s")
                shutil.rmtree(cfg.out / f"train-{method}", ignore_errors=True)
    finally:
        if out is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["table"] = summarize(results["runs"])
    print(markdown_table(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for method, label in METHODS:
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        if not accs:
            continue
        tasks = sorted({t for r in runs for t in r["per_task"]})
        per_task = {t: statistics.mean(r["per_task"][t] for r in runs if r["method"] == method) for t in tasks}
        rows.append({"method": label, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(accs), "per_task": per_task})
    return rows


def markdown_table(results: dict) -> str:
    tasks = sorted({t for row in results["table"] for t in row["per_task"]})
    lines = ["| method | held-out exact match (mean ± std) | " + " | ".join(tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for row in results["table"]:
        lines.append(f"| {row['method']} | {row['mean']:.1%} ± {row['std']:.1%} (n={row['n']}) | "
                     + " | ".join(f"{row['per_task'][t]:.1%}" for t in tasks) + " |")
    lines.append(f"\n{len(results['seeds'])} seeds, {results['steps']} steps each, total {results['seconds']:.0f}s; "
                 f"{results['machine']}")
    return "\n".join(lines)
