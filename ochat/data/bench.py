"""`ochat bench data`: the data pipeline on a synthetic ShareGPT corpus, side by side with its peers.

- clean: ochat's `clean_record` vs FastChat's `clean_html_one_sample` (fastchat/data/clean_sharegpt.py,
  the script Vicuna's data went through), one process each, on the same loaded pages;
- tokenize: ochat's batched `ConversationEncoder` vs Hugging Face `apply_chat_template(tokenize=True)`
  one conversation at a time (same ids), one process each;
- the whole pipeline (read -> ... -> Parquet) with 1 and with N worker processes, and the time
  90,000 pages would take at the measured rate.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class DataBenchResult:
    """The figures of one `ochat bench data` run (written as JSON as they are)."""
    pages: int
    workers: int
    figures: dict[str, Any] = field(default_factory=dict)


def bench_clean(raws: list, figures: dict[str, Any], console) -> list:
    """clean, one process each (ochat and FastChat), on the same pages already in memory."""
    from ochat.data.clean import CleanOptions, clean_record

    options = CleanOptions()
    t0, c0 = time.perf_counter(), time.process_time()
    cleaned = [clean_record(r, options) for r in raws]
    figures["clean_ochat_pages_s"] = _rate(len(raws), time.perf_counter() - t0)
    figures["clean_ochat_pages_cpu_s"] = _rate(len(raws), time.process_time() - c0)
    try:
        from fastchat.data.clean_sharegpt import clean_html_one_sample
    except ImportError:
        console.print("[yellow]FastChat not installed (pip install --no-deps fschat==0.2.36): no clean peer")
        return cleaned
    samples = [{"id": r.id, "conversations": [{"from": f, "value": v} for f, v in r.messages]} for r in raws]
    t0, c0 = time.perf_counter(), time.process_time()
    for sample in samples:
        clean_html_one_sample(sample)
    figures["clean_fastchat_pages_s"] = _rate(len(samples), time.perf_counter() - t0)
    figures["clean_fastchat_pages_cpu_s"] = _rate(len(samples), time.process_time() - c0)
    return cleaned


def bench_tokenize(records: list[dict], model_type: str, tokenizer: str, figures: dict[str, Any]) -> None:
    """tokenize, one process each (ochat's encoder and HF apply_chat_template), on the same conversations."""
    from ochat.data.pipeline import load_encoder
    from ochat.data.tokenize import tokenize_records
    from ochat.models.tokenizers import prepare_tokenizer
    from ochat.templates.registry import get_model_type

    encoder, _, _ = load_encoder(model_type, tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(records), 64):
        tokenize_records(encoder, records[i:i + 64], with_text=False)
    figures["tokenize_ochat_convs_s"] = _rate(len(records), time.perf_counter() - t0)
    figures["tokenize_ochat_convs_cpu_s"] = _rate(len(records), time.process_time() - c0)
    tok = encoder.tokenizer
    prepare_tokenizer(tok, get_model_type(model_type))  # sets the chat_template
    t0, c0 = time.perf_counter(), time.process_time()
    for r in records:
        msgs = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + \
               [{"role": m["role"], "content": m["content"]} for m in r["items"]]
        tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    figures["tokenize_hf_convs_s"] = _rate(len(records), time.perf_counter() - t0)
    figures["tokenize_hf_convs_cpu_s"] = _rate(len(records), time.process_time() - c0)


def bench_pipeline(corpus: Path, tmp: Path, pages: int, workers: int, model_type: str, tokenizer: str,
                   figures: dict[str, Any]) -> None:
    """The whole pipeline with 1 process and with `workers` processes."""
    from ochat.data.pipeline import run_pipeline

    cmap = "GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1"
    for w in sorted({1, workers}):
        t0, c0 = time.perf_counter(), _cpu()
        rep = run_pipeline([corpus], tmp / f"out{w}", model_type, tokenizer, condition_map=cmap, workers=w,
                           progress=True)
        dt, cpu = time.perf_counter() - t0, _cpu() - c0
        figures[f"pipeline_w{w}_s"] = round(dt, 1)
        figures[f"pipeline_w{w}_cpu_s"] = round(cpu, 1)
        figures[f"pipeline_w{w}_pages_s"] = _rate(pages, dt)
        figures[f"pipeline_w{w}_clean_cpu_s"] = rep["steps"]["clean"]["cpu_seconds"]
        figures[f"pipeline_w{w}_tokenize_cpu_s"] = rep["steps"]["tokenize"]["cpu_seconds"]
        figures["train_rows"] = rep["outputs"]["train"]["rows"]
        figures["tokens"] = rep["outputs"]["train"]["tokens"] + rep["outputs"]["eval"]["tokens"]
        figures["dropped"] = {k: v["dropped"] for k, v in rep["steps"].items() if v["dropped"]}
    figures["projected_90k_pages_min"] = round(90000 / figures[f"pipeline_w{workers}_pages_s"] / 60, 1)
    # The machine may be shared: CPU seconds are what the work costs whatever the load. On an
    # idle machine with `workers` cores fully used it would take CPU / workers of wall time.
    cpu_per_page = figures[f"pipeline_w{workers}_cpu_s"] / pages
    figures["cpu_s_per_page"] = round(cpu_per_page, 5)
    figures["projected_90k_pages_min_idle"] = round(90000 * cpu_per_page / workers / 60, 1)


def run_data_bench(pages: int, peer_pages: int, workers: int, model_type: str, tokenizer: str, seed: int,
                   console) -> DataBenchResult:
    from ochat.data.sources import read_file
    from ochat.synthetic.sharegpt_pages import write_pages

    result = DataBenchResult(pages, workers)
    figures = result.figures
    figures.update({"pages": pages, "peer_pages": peer_pages, "workers": workers, "model_type": model_type,
                    "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0]})
    tmp = Path(tempfile.mkdtemp(prefix="ochat-bench-data-"))
    try:
        console.print(f"generating {pages} synthetic ShareGPT pages ...")
        corpus = write_pages(tmp / "pages", pages, seed=seed)
        files = sorted(corpus.iterdir())
        figures["corpus_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 1)
        cleaned = bench_clean([next(read_file(f)) for f in files[:peer_pages]], figures, console)
        bench_tokenize([c.record for c in cleaned if c.record is not None], model_type, tokenizer, figures)
        bench_pipeline(corpus, tmp, pages, workers, model_type, tokenizer, figures)
        figures["loadavg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def render_data_bench(result: DataBenchResult):
    from rich.table import Table

    r, workers = result.figures, result.workers
    table = Table(title=f"ochat bench data ({result.pages} pages, {r['corpus_mb']} MB, {r.get('tokens', 0)} tokens; "
                        f"load average {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f} on {r['cpu_count']} cores)")
    for col in ("what", "ochat", "peer", "ratio"):
        table.add_column(col)
    if "clean_fastchat_pages_s" in r:
        table.add_row("clean, 1 process (pages per CPU-second)", f"{r['clean_ochat_pages_cpu_s']:.0f}",
                      f"FastChat {r['clean_fastchat_pages_cpu_s']:.0f}",
                      f"{r['clean_ochat_pages_cpu_s'] / r['clean_fastchat_pages_cpu_s']:.2f}x (goal >= 5x)")
    table.add_row("tokenize, 1 process (conv per CPU-second)", f"{r['tokenize_ochat_convs_cpu_s']:.0f}",
                  f"HF apply_chat_template {r['tokenize_hf_convs_cpu_s']:.0f}",
                  f"{r['tokenize_ochat_convs_cpu_s'] / r['tokenize_hf_convs_cpu_s']:.2f}x")
    if workers > 1:
        table.add_row(f"pipeline, {workers} processes (pages/s)", f"{r[f'pipeline_w{workers}_pages_s']:.0f}",
                      f"1 process {r['pipeline_w1_pages_s']:.0f}",
                      f"{r[f'pipeline_w{workers}_pages_s'] / r['pipeline_w1_pages_s']:.2f}x")
    else:
        table.add_row("pipeline, 1 process (pages/s)", f"{r['pipeline_w1_pages_s']:.0f}", "", "")
    table.add_row("90,000 pages at this wall rate (min)", f"{r['projected_90k_pages_min']}", "goal < 3", "")
    table.add_row(f"90,000 pages, idle {workers} cores, from CPU time (min)", f"{r['projected_90k_pages_min_idle']}",
                  "goal < 3", "")
    return table


def bench_data(
    pages: int = typer.Option(3000, "--pages", help="Synthetic ShareGPT pages to generate"),
    peer_pages: int = typer.Option(600, "--peer-pages", help="Pages for the side-by-side clean/tokenize runs"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes for the parallel run (default: all cores)"),
    model_type: str = typer.Option("openchat_3.5", "--model-type"),
    tokenizer: str = typer.Option("mistral-common", "--tokenizer"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the figures as JSON"),
) -> None:
    """Pages/s for clean and tokenize (vs FastChat and HF apply_chat_template) and for the whole pipeline."""
    from rich.console import Console

    console = Console(stderr=True)
    result = run_data_bench(pages, peer_pages, workers or os.cpu_count() or 1, model_type, tokenizer, seed, console)
    console.print(render_data_bench(result))
    print(json.dumps(result.figures, indent=2))
    if json_out:
        json_out.write_text(json.dumps(result.figures, indent=2) + "\n")
