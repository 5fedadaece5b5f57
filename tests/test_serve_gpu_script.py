"""benchmarks/serve_gpu.py (the GPU check of the transformers engine) runs end to end here, on the CPU with a
tiny model, so that it is known to work before GPU time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_serve_script_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_serve.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_gpu.py"), "--size", "tiny", "--levels", "1,2",
                        "--rounds", "1", "--max-tokens", "8", "--dtype", "float32", "--out", str(out)],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [x["name"] for x in data["results"]] == ["ochat serve --engine transformers",
                                                    "transformers serve --continuous-batching"]
    for result in data["results"]:
        assert [row["concurrency"] for row in result["levels"]] == [1, 2]
        assert all(row["errors"] == 0 and row["requests"] >= 1 and row["output_tokens_per_s"] > 0
                   for row in result["levels"]), result
    assert data["device"]["cuda"] is False and "c=2: ochat serve" in r.stdout
