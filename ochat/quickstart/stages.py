"""The quickstart, stage by stage: corpus -> data pipeline -> tiny model -> C-RLFT training -> accuracy.

Each stage writes its outputs under OUT and then a marker `OUT/.stages/NAME.json` (atomically) with
the settings it ran with. A re-run skips a stage whose marker matches its settings and whose earlier
stages were skipped too; anything else runs again (and so does every stage after it).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ochat.synthetic.quickstart_corpus import CorpusConfig, read_test, write_quickstart_corpus
from ochat.utils.atomic import atomic_write_text

MODEL_TYPE = "openchat_3.5"
TOKENIZER = "mistral-common"
EXPERT_CONDITION = "GPT4 Correct"   # what OpenChat 3.5 calls its GPT-4 class; the default at inference
NOVICE_CONDITION = "GPT3"
NOVICE_WEIGHT = 0.1                 # the paper's class weight for GPT-3.5 answers


def condition_map(kind: str = "crlft") -> dict[str, list]:
    """Model label -> [condition, weight] for the data pipeline.

    crlft: the expert and the novice get their own conditions and class weights (C-RLFT);
    sft_mixed: both are plain training data under one condition; sft_expert: the expert only."""
    if kind == "crlft":
        return {"GPT-4": [EXPERT_CONDITION, 1.0], "GPT-3.5": [NOVICE_CONDITION, NOVICE_WEIGHT]}
    if kind == "sft_mixed":
        return {"GPT-4": [EXPERT_CONDITION, 1.0], "GPT-3.5": [EXPERT_CONDITION, 1.0]}
    if kind == "sft_expert":
        return {"GPT-4": [EXPERT_CONDITION, 1.0]}
    raise ValueError(kind)


@dataclass
class QuickstartConfig:
    out: Path = Path("ochat-quickstart")
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 700
    batch_max_len: int = 1024
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    progress: bool = True


PATH_KEYS = ("dir", "prefix", "checkpoint", "metrics", "file")  # stored relative to OUT in the markers


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Stages:
    """Runs stages in order, reusing those whose marker matches (see the module docstring)."""

    def __init__(self, out: Path, total: int):
        self.out = out
        self.dir = out / ".stages"
        self.total = total
        self.index = 0
        self.chain_reused = True  # all stages so far were reused

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def run(self, name: str, title: str, settings: dict[str, Any], fn: Callable[[], dict[str, Any]],
            outputs: Callable[[dict[str, Any]], list[Path]] = lambda result: []) -> dict[str, Any]:
        """Run `fn` (or reuse its last result); `outputs(result)` lists files that must still exist to reuse it."""
        self.index += 1
        head = f"[{self.index}/{self.total}] {title}"
        settings = json.loads(json.dumps(settings, default=str))
        path = self.marker(name)
        if self.chain_reused and path.exists():
            try:
                done = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                done = {}
            result = self._absolute(done.get("result", {}))
            if done.get("settings") == settings and all(p.exists() for p in outputs(result)):
                say(f"{head}: reusing the finished stage ({path})")
                return result
        self.chain_reused = False
        path.unlink(missing_ok=True)
        say(f"{head} ...")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        result = json.loads(json.dumps({**result, "seconds": round(seconds, 1)}, default=str))
        atomic_write_text(path, json.dumps({"settings": settings, "result": self._relative(result)}, indent=2) + "\n")
        say(f"{head}: done in {seconds:.0f}s")
        return result

    # Paths inside OUT are stored relative to it, so a moved or copied OUT is still reusable.
    def _relative(self, result: dict[str, Any]) -> dict[str, Any]:
        root = self.out.resolve()
        rel = {k: os.path.relpath(Path(v).resolve(), root) for k, v in result.items()
               if k in PATH_KEYS and isinstance(v, str) and Path(v).resolve().is_relative_to(root)}
        return {**result, **rel}

    def _absolute(self, result: dict[str, Any]) -> dict[str, Any]:
        return {**result, **{k: str(self.out / v) for k, v in result.items()
                             if k in PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute()}}


def steps_per_epoch(data_prefix: Path, batch_max_len: int, seed: int) -> int:
    from ochat.data.tokenized import read_tokenized
    from ochat.training.multipack import MultipackSampler

    table, _ = read_tokenized(f"{data_prefix}.train.parquet")
    lengths = table.column("length").to_numpy()
    return max(1, MultipackSampler(lengths, batch_max_len, 1, seed).num_steps(0))


def run_corpus(cfg: QuickstartConfig) -> dict[str, Any]:
    corpus_dir = cfg.out / "corpus"
    summary = write_quickstart_corpus(corpus_dir, cfg.corpus, overwrite=True)
    say(f"  {summary['conversations']} conversations ({summary['expert']} expert 'GPT-4', {summary['novice']} "
        f"novice 'GPT-3.5'; {summary['wrong_answers']} of {summary['answers']} answers wrong): "
        f"{summary['pages']} pages in {corpus_dir / 'pages'}, {summary['json_dump']} in {corpus_dir / 'sharegpt.json'}; "
        f"{summary['test_questions']} held-out questions in {corpus_dir / 'test.jsonl'}")
    return {"dir": str(corpus_dir), **{k: summary[k] for k in ("conversations", "expert", "novice", "test_questions")}}


def run_data(cfg: QuickstartConfig, kind: str = "crlft", out: Path | None = None) -> dict[str, Any]:
    from ochat.data.pipeline import run_pipeline

    corpus_dir = cfg.out / "corpus"
    data_dir = out or cfg.out / "data"
    say(f"  condition map: {json.dumps(condition_map(kind))}")
    report = run_pipeline([corpus_dir / "pages", corpus_dir / "sharegpt.json"], data_dir, MODEL_TYPE, TOKENIZER,
                          condition_map=condition_map(kind), eval_ratio=0.02, seed=cfg.seed, progress=cfg.progress)
    outputs = report.get("outputs", {})
    return {"prefix": str(data_dir / MODEL_TYPE), "train_rows": outputs.get("train", {}).get("rows"),
            "eval_rows": outputs.get("eval", {}).get("rows")}


def run_model(cfg: QuickstartConfig) -> dict[str, Any]:
    from ochat.models.tiny import make_tiny_model

    path = make_tiny_model(cfg.out / "base-model", TOKENIZER, MODEL_TYPE, arch="mistral", hidden_size=cfg.hidden_size,
                           layers=cfg.layers, heads=cfg.heads, max_positions=2048, seed=cfg.seed, overwrite=True)
    params = _count_params(path)
    say(f"  Mistral architecture, hidden {cfg.hidden_size}, {cfg.layers} layers, {params / 1e6:.1f}M parameters, "
        f"Mistral-7B tokenizer + <|end_of_turn|>: {path}")
    return {"dir": str(path), "parameters": params}


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def run_train(cfg: QuickstartConfig, model_dir: Path, data_prefix: Path, save: Path, steps: int | None = None,
              seed: int | None = None) -> dict[str, Any]:
    from ochat.training.train import TrainArgs, train

    steps = steps or cfg.steps
    seed = cfg.seed if seed is None else seed
    per_epoch = steps_per_epoch(data_prefix, cfg.batch_max_len, seed)
    epochs = math.ceil(steps / per_epoch) + 1  # max_steps stops it; the schedule spans `steps`
    args = TrainArgs(model=model_dir, data=str(data_prefix), save=save, epochs=epochs, max_steps=steps,
                     batch_max_len=cfg.batch_max_len, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, seed=seed,
                     save_every=epochs, state_every=0, overwrite=True, progress=cfg.progress)
    ckpt = train(args)
    return {"checkpoint": str(ckpt), "steps": steps, "epochs": epochs, "metrics": str(save / "metrics.jsonl")}


def run_accuracy(cfg: QuickstartConfig, checkpoint: Path) -> dict[str, Any]:
    from ochat.quickstart.accuracy import exact_match

    questions = read_test(cfg.out / "corpus" / "test.jsonl")
    results = {}
    for label, condition in (("expert", EXPERT_CONDITION), ("novice", NOVICE_CONDITION)):
        r = exact_match(checkpoint, questions, condition, progress=cfg.progress)
        results[label] = r
    path = cfg.out / "accuracy.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return {"file": str(path), "accuracy": results["expert"]["accuracy"], "per_task": results["expert"]["per_task"],
            "novice_condition_accuracy": results["novice"]["accuracy"], "examples": results["expert"]["examples"],
            "total": results["expert"]["total"], "correct": results["expert"]["correct"]}


def accuracy_line(acc: dict[str, Any]) -> str:
    per_task = ", ".join(f"{t} {v:.0%}" for t, v in acc["per_task"].items())
    return (f"held-out exact-match accuracy (greedy, condition '{EXPERT_CONDITION}'): {acc['accuracy']:.1%} "
            f"({acc['correct']}/{acc['total']}; {per_task}); with the novice's condition '{NOVICE_CONDITION}': "
            f"{acc['novice_condition_accuracy']:.1%}")


def run_quickstart(cfg: QuickstartConfig, serve: bool = False) -> dict[str, Any]:
    """Run (or reuse) every stage but serving; return each stage's result."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(cfg.out, total=6 if serve else 5)
    cfg.corpus.seed = cfg.seed
    corpus_settings = asdict(cfg.corpus)
    r: dict[str, Any] = {}
    r["corpus"] = stages.run("corpus", "mixed-quality corpus (expert GPT-4 + novice GPT-3.5)", corpus_settings,
                             lambda: run_corpus(cfg), lambda res: [Path(res["dir"]) / "test.jsonl"])
    r["data"] = stages.run("data", "data pipeline: clean, label with the condition map, tokenize",
                           {"condition_map": condition_map(), "model_type": MODEL_TYPE, "seed": cfg.seed},
                           lambda: run_data(cfg), lambda res: [Path(res["prefix"] + ".train.parquet")])
    r["model"] = stages.run("model", "tiny Mistral-architecture model",
                            {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "heads": cfg.heads, "seed": cfg.seed},
                            lambda: run_model(cfg), lambda res: [Path(res["dir"]) / "config.json"])
    r["train"] = stages.run("train", "C-RLFT training (padding-free packing)",
                            {"steps": cfg.steps, "batch_max_len": cfg.batch_max_len, "lr": cfg.lr,
                             "warmup_ratio": cfg.warmup_ratio, "seed": cfg.seed},
                            lambda: run_train(cfg, Path(r["model"]["dir"]), Path(r["data"]["prefix"]),
                                              cfg.out / "checkpoints"),
                            lambda res: [Path(res["checkpoint"]) / "config.json"])
    r["accuracy"] = stages.run("accuracy", "held-out exact-match accuracy", {"after": "train"},
                               lambda: run_accuracy(cfg, Path(r["train"]["checkpoint"])),
                               lambda res: [Path(res["file"])])
    say(accuracy_line(r["accuracy"]))
    return r
