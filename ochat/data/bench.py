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
from pathlib import Path
from typing import Optional

import typer


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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
    from rich.table import Table

    from ochat.data.clean import CleanOptions, clean_record
    from ochat.data.pipeline import load_encoder, run_pipeline
    from ochat.data.sources import read_file
    from ochat.synthetic.sharegpt_pages import write_pages
    from ochat.data.tokenize import tokenize_records

    console = Console(stderr=True)
    workers = workers or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="ochat-bench-data-"))
    results: dict = {"pages": pages, "peer_pages": peer_pages, "workers": workers, "model_type": model_type,
                     "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    try:
        console.print(f"generating {pages} synthetic ShareGPT pages ...")
        corpus = write_pages(tmp / "pages", pages, seed=seed)
        files = sorted(corpus.iterdir())
        results["corpus_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 1)

        # -- clean, one process each, same pages already in memory
        raws = [next(read_file(f)) for f in files[:peer_pages]]
        options = CleanOptions()
        t0, c0 = time.perf_counter(), time.process_time()
        cleaned = [clean_record(r, options) for r in raws]
        results["clean_ochat_pages_s"] = _rate(len(raws), time.perf_counter() - t0)
        results["clean_ochat_pages_cpu_s"] = _rate(len(raws), time.process_time() - c0)
        try:
            from fastchat.data.clean_sharegpt import clean_html_one_sample
        except ImportError:
            clean_html_one_sample = None
            console.print("[yellow]FastChat not installed (pip install --no-deps fschat==0.2.36): no clean peer")
        if clean_html_one_sample is not None:
            samples = [{"id": r.id, "conversations": [{"from": f, "value": v} for f, v in r.messages]} for r in raws]
            t0, c0 = time.perf_counter(), time.process_time()
            for s in samples:
                clean_html_one_sample(s)
            results["clean_fastchat_pages_s"] = _rate(len(samples), time.perf_counter() - t0)
            results["clean_fastchat_pages_cpu_s"] = _rate(len(samples), time.process_time() - c0)

        # -- tokenize, one process each, same conversations
        encoder, _, _ = load_encoder(model_type, tokenizer)
        records = [c.record for c in cleaned if c.record is not None]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(records), 64):
            tokenize_records(encoder, records[i:i + 64], with_text=False)
        results["tokenize_ochat_convs_s"] = _rate(len(records), time.perf_counter() - t0)
        results["tokenize_ochat_convs_cpu_s"] = _rate(len(records), time.process_time() - c0)
        tok = encoder.tokenizer
        from ochat.models.tokenizers import prepare_tokenizer
        from ochat.templates.registry import get_model_type

        prepare_tokenizer(tok, get_model_type(model_type))  # sets the chat_template
        t0, c0 = time.perf_counter(), time.process_time()
        for r in records:
            msgs = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + \
                   [{"role": m["role"], "content": m["content"]} for m in r["items"]]
            tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        results["tokenize_hf_convs_s"] = _rate(len(records), time.perf_counter() - t0)
        results["tokenize_hf_convs_cpu_s"] = _rate(len(records), time.process_time() - c0)

        # -- the whole pipeline, 1 process and `workers` processes
        cmap = "GPT-4=GPT4:1.0,GPT-3.5=GPT3:0.1"
        for w in sorted({1, workers}):
            out = tmp / f"out{w}"
            t0, c0 = time.perf_counter(), _cpu()
            rep = run_pipeline([corpus], out, model_type, tokenizer, condition_map=cmap, workers=w, progress=True,
                               print_table=False)
            dt, cpu = time.perf_counter() - t0, _cpu() - c0
            results[f"pipeline_w{w}_s"] = round(dt, 1)
            results[f"pipeline_w{w}_cpu_s"] = round(cpu, 1)
            results[f"pipeline_w{w}_pages_s"] = _rate(pages, dt)
            results[f"pipeline_w{w}_clean_s"] = rep["steps"]["clean"]["seconds"]
            results[f"pipeline_w{w}_tokenize_s"] = rep["steps"]["tokenize"]["seconds"]
            results["train_rows"] = rep["outputs"]["train"]["rows"]
            results["tokens"] = rep["outputs"]["train"]["tokens"] + rep["outputs"]["eval"]["tokens"]
            results["dropped"] = {k: v["dropped"] for k, v in rep["steps"].items() if v["dropped"]}
        best = results[f"pipeline_w{workers}_pages_s"]
        results["projected_90k_pages_min"] = round(90000 / best / 60, 1)
        # The machine may be shared: CPU seconds are what the work costs whatever the load. On an
        # idle machine with `workers` cores fully used it would take CPU / workers of wall time.
        cpu_per_page = results[f"pipeline_w{workers}_cpu_s"] / pages
        results["cpu_s_per_page"] = round(cpu_per_page, 5)
        results["projected_90k_pages_min_idle"] = round(90000 * cpu_per_page / workers / 60, 1)
        results["loadavg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    r = results
    table = Table(title=f"ochat bench data ({pages} pages, {r['corpus_mb']} MB, {r.get('tokens', 0)} tokens; "
                        f"load average {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f} on {r['cpu_count']} cores)")
    for col in ("what", "ochat", "peer", "ratio"):
        table.add_column(col)
    if "clean_fastchat_pages_s" in r:
        table.add_row("clean, 1 process (pages per CPU-second)", f"{r['clean_ochat_pages_cpu_s']:.0f}",
                      f"FastChat {r['clean_fastchat_pages_cpu_s']:.0f}",
                      f"{r['clean_ochat_pages_cpu_s'] / r['clean_fastchat_pages_cpu_s']:.2f}x")
    table.add_row("tokenize, 1 process (conv per CPU-second)", f"{r['tokenize_ochat_convs_cpu_s']:.0f}",
                  f"HF apply_chat_template {r['tokenize_hf_convs_cpu_s']:.0f}",
                  f"{r['tokenize_ochat_convs_cpu_s'] / r['tokenize_hf_convs_cpu_s']:.2f}x")
    if workers > 1:
        table.add_row(f"pipeline, {workers} processes (pages/s)", f"{r[f'pipeline_w{workers}_pages_s']:.0f}",
                      f"1 process {r['pipeline_w1_pages_s']:.0f}",
                      f"{r[f'pipeline_w{workers}_pages_s'] / r['pipeline_w1_pages_s']:.2f}x")
    else:
        table.add_row("pipeline, 1 process (pages/s)", f"{r['pipeline_w1_pages_s']:.0f}", "", "")
    table.add_row("90,000 pages at this wall rate (min)", f"{r['projected_90k_pages_min']}", "goal 10", "")
    table.add_row(f"90,000 pages, idle {workers} cores, from CPU time (min)", f"{r['projected_90k_pages_min_idle']}",
                  "goal 10", "")
    console.print(table)
    print(json.dumps(results, indent=2))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
