"""benchmarks/train_gpu_1b.py (the H100/H200 training check) runs end to end on CPU with a toy model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_training_script_smoke_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_gpu_1b.py"), "--tiny", "--steps", "2",
                           "--warmup", "1", "--row-len", "1024", "--trl", "--trl-steps", "2"],
                          env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["gradient_checkpointing"] for r in out["results"]] == [False, True]
    for r in out["results"]:
        assert r["attention"] == "ochat_varlen_sdpa" and r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"])
    # same seed, same rows: checkpointing changes memory and time, not the numbers
    assert out["results"][0]["final_loss"] == out["results"][1]["final_loss"]
    assert out["trl"]["steps"] == 2 and out["trl"]["tokens_per_s"] > 0
