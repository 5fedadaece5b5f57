"""`ochat bench serve` end to end on the tiny model: two real servers take turns over two passes (the second in
reverse order); the JSON keeps each pass's figure and the summary gives the ratios, pooled and pass by pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_two_servers_two_passes(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "ochat", "bench", "serve", "--size", "tiny", "--servers",
                        "ochat-transformers,transformers", "--concurrency", "1,2", "--rounds", "1", "--repeats", "2",
                        "--max-tokens", "4", "--out", str(out)],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [x["name"] for x in data["results"]] == ["ochat serve --engine transformers", "transformers serve"]
    for result in data["results"]:
        for row, c in zip(result["levels"], (1, 2), strict=True):
            assert row["concurrency"] == c and row["errors"] == 0 and row["requests"] == 2 * c
            assert len(row["pass_tokens_per_s"]) == 2 and all(t > 0 for t in row["pass_tokens_per_s"])
    # No vLLM here: the first server is the reference.
    assert data["summary"][1].startswith("c=2: vs ochat serve --engine transformers")
    assert "transformers serve" in data["summary"][1] and "x (median per pass " in data["summary"][1]


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]      # R, S, T (stopped), ...


def _eventually(check, timeout: float = 30.0) -> bool:
    """`check()` became true within `timeout` s (a signalled process changes state when it is next scheduled)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_only_the_measured_server_runs():
    """`_run_alone` stops every other server's whole process group (a child too) and continues the measured one's."""
    import signal

    from ochat.serving.bench import _run_alone

    child = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", child], process_group=0) for _ in range(2)]
    specs = [{"pgid": p.pid} for p in procs]

    def group(pid: int) -> list[int]:
        found = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
        return [int(x) for x in found]

    try:
        assert all(_eventually(lambda p=p: len(group(p.pid)) == 2) for p in procs)      # parent and child
        groups = [group(p.pid) for p in procs]
        for current, other in ((0, 1), (1, 0)):
            _run_alone(specs, specs[current])
            assert _eventually(lambda: all(_state(pid) == "T" for pid in groups[other]))
            assert _eventually(lambda: all(_state(pid) != "T" for pid in groups[current]))
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
