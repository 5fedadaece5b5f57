"""Training step time with and without projecting only the supervised positions onto the vocabulary.

    ochat quickstart --out /tmp/qs2 --no-serve          # the data and base model it trains
    python benchmarks/train_supervised_logits.py --quickstart /tmp/qs2 --steps 100

Runs `ochat train` twice on the quickstart's data (same seed): once as shipped (`logits_to_keep` =
supervised positions), once with full logits. Prints wall time, median tokens/s and the final loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ochat.training.train as T


def run(quickstart: Path, steps: int, supervised_only: bool) -> dict:
    T.accepts_logits_to_keep = ACCEPTS if supervised_only else (lambda model: False)
    save = Path(tempfile.mkdtemp(prefix="ochat-logits-"))
    t0 = time.perf_counter()
    T.train(T.TrainArgs(model=quickstart / "base-model", data=str(quickstart / "data" / "openchat_3.5"), save=save,
                        epochs=1, max_steps=steps, batch_max_len=1024, lr=3e-3, seed=0, state_every=0,
                        overwrite=True, progress=False))
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"supervised_only": supervised_only, "seconds": round(time.perf_counter() - t0, 1),
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in records)),
            "final_loss": round(records[-1]["loss"], 5)}


ACCEPTS = T.accepts_logits_to_keep

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", type=Path, default=Path("ochat-quickstart"))
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    for supervised_only in (True, False, True):
        print(json.dumps(run(a.quickstart, a.steps, supervised_only)), flush=True)
