"""`ochat eval fewshot`: few-shot benchmarks run by EleutherAI's lm-evaluation-harness against `ochat serve`.

lm-eval does the prompting, answer extraction, filters and metrics; ochat only points its task YAMLs
at local data files and its API models at a served model (an in-process `ochat serve` for `--model DIR`):

- `--mc FILE.jsonl`: MMLU-style multiple choice by log-likelihood (`local-completions`: the server's
  `echo` + `logprobs` prompt log-probabilities); rows `{"question", "choices": [...], "answer": index}`.
- `--gen FILE.jsonl`: GSM8K-style generation with lm-eval's gsm8k filters (`local-chat-completions`);
  rows `{"question", "answer": "... #### 42"}`.
- `--tasks NAMES --include-path DIR`: any other lm-eval task YAMLs, through `local-completions`.

A sibling `FILE.dev.jsonl` holds the few-shot examples (MMLU's dev split); without it they come from
FILE itself (lm-eval never shows a question as its own example). The task YAMLs are written next to
`--out` (`tasks/`), so the same run can be repeated with the `lm_eval` command printed in the summary.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ochat.errors import OchatError
from ochat.serving.inprocess import endpoint
from ochat.utils.atomic import atomic_write_text

# kind -> (task YAML template in lm_eval_tasks/, lm-eval model)
KINDS = {"mc": ("multiple_choice.yaml", "local-completions"), "gen": ("generation.yaml", "local-chat-completions")}


@dataclass(frozen=True)
class LocalTask:
    """A task YAML template pointed at a local JSONL file."""
    name: str
    kind: str
    data: Path
    fewshot_data: Path | None = None

    @classmethod
    def from_file(cls, kind: str, path: str | Path) -> "LocalTask":
        path = Path(path).resolve()
        if not path.is_file() or path.suffix != ".jsonl":
            raise OchatError(f"--{kind} {path}: expected a .jsonl file")
        dev = path.with_name(path.stem + ".dev.jsonl")
        return cls(re.sub(r"[^A-Za-z0-9_]+", "_", path.stem), kind, path, dev if dev.is_file() else None)

    def config(self) -> dict[str, Any]:
        import yaml  # lm-eval's dependency

        template = resources.files("ochat.evaluation").joinpath("lm_eval_tasks", KINDS[self.kind][0]).read_text()
        files = {"test": str(self.data), **({"dev": str(self.fewshot_data)} if self.fewshot_data else {})}
        return {"task": self.name, **yaml.safe_load(template), "dataset_kwargs": {"data_files": files},
                "fewshot_split": "dev" if self.fewshot_data else "test"}


def write_task_dir(tasks: list[LocalTask], out: Path) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        atomic_write_text(out / f"{t.name}.yaml", yaml.safe_dump(t.config(), sort_keys=False, allow_unicode=True))
    return out


@dataclass
class TaskScore:
    task: str
    metric: str      # lm-eval's metric name: acc, exact_match, ...
    filter: str      # lm-eval's filter: none, strict-match, flexible-extract
    value: float
    stderr: float | None
    n: int


@dataclass
class FewshotResult:
    model: str
    scores: list[TaskScore]
    lm_eval_commands: list[str] = field(default_factory=list)
    lm_eval_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FewshotResult":
        return cls(d["model"], [TaskScore(**s) for s in d["scores"]], d.get("lm_eval_commands", []),
                   d.get("lm_eval_version", ""))


def scores_of(results: dict[str, Any]) -> list[TaskScore]:
    """lm-eval's `results` ({task: {"acc,none": v, "acc_stderr,none": se}}) as rows."""
    out = []
    for task, metrics in sorted(results["results"].items()):
        n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr,{filt}")
            out.append(TaskScore(task, metric, filt, float(value), se if isinstance(se, (int, float)) else None, n))
    return out


def model_args(lm_model: str, base_url: str, model_name: str, tokenizer: str | None, tokenized_requests: bool,
               parallel: int, max_tokens: int) -> dict[str, Any]:
    """lm-eval's arguments for its OpenAI-compatible API models."""
    args: dict[str, Any] = {"model": model_name, "num_concurrent": parallel, "max_retries": 3, "max_gen_toks": max_tokens}
    if lm_model == "local-chat-completions":
        return {**args, "base_url": f"{base_url}/chat/completions"}
    if tokenizer is None:
        raise OchatError("--tokenizer DIR is needed with --api-base: lm-eval counts the prompt's tokens itself "
                         "(the served model's Hugging Face tokenizer)")
    return {**args, "base_url": f"{base_url}/completions", "tokenizer": tokenizer, "tokenizer_backend": "huggingface",
            "tokenized_requests": tokenized_requests}


def lm_eval_command(lm_model: str, args: dict[str, Any], include_path: str | None, tasks: list[str],
                    num_fewshot: int | None, limit: int | None) -> str:
    """The same run with lm-eval's own CLI."""
    cmd = f"lm_eval --model {lm_model} --model_args " + ",".join(f"{k}={v}" for k, v in args.items())
    cmd += (f" --include_path {include_path}" if include_path else "") + f" --tasks {','.join(tasks)}"
    cmd += " --apply_chat_template" if lm_model == "local-chat-completions" else ""
    cmd += (f" --num_fewshot {num_fewshot}" if num_fewshot is not None else "") + (f" --limit {limit}" if limit else "")
    return cmd


def evaluate(lm_model: str, args: dict[str, Any], tasks: list[str], include_path: list[str], named: list[str],
             num_fewshot: int | None, limit: int | None) -> dict[str, Any]:
    """One lm-eval run (`simple_evaluate`), with per-sample logs."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as e:
        raise OchatError(f"ochat eval fewshot needs lm-eval ({e.name} is missing): pip install 'ochat[eval]'") from None
    # Indexing lm-eval's own ~10,000 task YAMLs takes half a minute: only when a task is named.
    manager = TaskManager(include_path=include_path, include_defaults=bool(named))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise OchatError(f"--tasks: lm-eval knows no task {', '.join(unknown)} (add its YAML with --include-path)")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return lm_eval.simple_evaluate(model=lm_model, model_args=args, tasks=tasks, task_manager=manager,
                                   num_fewshot=num_fewshot, limit=limit, log_samples=True, verbosity="WARNING",
                                   apply_chat_template=lm_model == "local-chat-completions")


def sample_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-question records: the document, what lm-eval sent and got back, its filtered answer and score."""
    rows = []
    for task, samples in sorted(results.get("samples", {}).items()):
        for s in samples:
            rows.append({"task": task, **{k: s[k] for k in ("doc_id", "doc", "target", "arguments", "resps",
                                                            "filtered_resps", "filter") if k in s},
                         "metrics": {k: s[k] for k in s.get("metrics", []) if k in s}})
    return rows


def run_fewshot(mc: list[str], gen: list[str], tasks: list[str], include_path: str | None, model_dir: str | None,
                api_base: str | None, model_name: str | None, tokenizer: str | None = None,
                tokenized_requests: bool = True, num_fewshot: int | None = None, limit: int | None = None,
                parallel: int = 8, max_tokens: int = 256, out: str | None = None,
                console: Console | None = None) -> FewshotResult:
    console = console or Console(stderr=True)
    local = [LocalTask.from_file("mc", p) for p in mc] + [LocalTask.from_file("gen", p) for p in gen]
    if not local and not tasks:
        raise OchatError("give tasks: --mc FILE.jsonl, --gen FILE.jsonl or --tasks NAMES [--include-path DIR]")
    if len({t.name for t in local}) < len(local):
        raise OchatError("--mc/--gen: two data files share a name; their task names would collide")
    out_path = Path(out) if out else None
    if out_path and out_path.suffix != ".json":
        raise OchatError(f"--out {out}: expected a .json file (DIR/fewshot/MODEL.json, read by `ochat eval report DIR`)")
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = write_task_dir(local, out_path.parent / "tasks" if out_path else Path(tmp))
        runs = {lm: [t.name for t in local if KINDS[t.kind][1] == lm] for lm in ("local-completions", "local-chat-completions")}
        runs["local-completions"] += tasks
        includes = [str(task_dir)] + ([include_path] if include_path else [])
        scores, commands, samples = [], [], []
        with endpoint(model_dir, api_base, model_name) as (base_url, served):
            tok = tokenizer or model_dir
            for lm, names in runs.items():
                if not names:
                    continue
                args = model_args(lm, base_url, served, tok, tokenized_requests, parallel, max_tokens)
                commands.append(lm_eval_command(lm, args, includes[0], names, num_fewshot, limit)
                                + (f"  # with the YAMLs of {include_path} copied there (lm_eval takes one folder)"
                                   if include_path else ""))
                console.print(f"fewshot: {lm} on {', '.join(names)} ...")
                results = evaluate(lm, args, names, includes, tasks, num_fewshot, limit)
                scores += scores_of(results)
                samples += sample_rows(results)
    import lm_eval

    result = FewshotResult(out_path.stem if out_path else served, scores, commands, getattr(lm_eval, "__version__", ""))
    Console().print(render(result))
    if out_path:
        atomic_write_text(out_path, json.dumps(result.to_json(), indent=2) + "\n")
        samples_path = out_path.with_suffix(".samples.jsonl")
        atomic_write_text(samples_path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in samples))
        console.print(f"fewshot: scores -> {out_path}, per question -> {samples_path}, task YAMLs -> {task_dir}")
    return result


def render(result: FewshotResult) -> Table:
    table = Table(title=f"few-shot scores ({result.model}, lm-eval {result.lm_eval_version})")
    for col in ("task", "metric", "filter", "value %", "± SE", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric", "filter") else "right")
    for s in result.scores:
        se = "-" if s.stderr is None else f"{100 * s.stderr:.1f}"
        table.add_row(s.task, s.metric, s.filter, f"{100 * s.value:.1f}", se, str(s.n))
    return table
