"""Load and fault test for `ochat serve` (loopback only, bounded in time).

    python benchmarks/serve_load_test.py [--requests 2000] [--concurrency 64] [--model DIR]

Starts `ochat serve` on the tiny model as a separate process, then sends `--requests` requests from
`--concurrency` clients: valid chat/completion requests (streaming or not), requests the client cancels
midway (closes the connection), and malformed ones (bad JSON, bad fields, unknown model, over-long prompt,
oversized body). Checks: zero 5xx, every valid request answered completely, malformed ones answered with
4xx in OpenAI's error shape, no leaked batch slots afterwards (/metrics: 0 running, 0 waiting), and reports
the server's resident memory growth. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def rss_mib(pid: int) -> float:
    """Resident memory of the server process and its children (the engine process)."""
    total = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += rss_mib(int(child))
            except OSError:         # exited meanwhile
                pass
    return total


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


MALFORMED = [
    ("bad json", b'{"model": "openchat_3.5", "messages": [', 400),
    ("not an object", b'[1, 2, 3]', 400),
    ("no messages", json.dumps({"model": "openchat_3.5"}).encode(), 400),
    ("bad role", json.dumps({"model": "openchat_3.5", "messages": [{"role": "robot", "content": "x"}]}).encode(), 400),
    ("bad temperature", json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "x"}],
                                    "temperature": "hot"}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
    ("huge n", json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "x"}], "n": 10**6}).encode(), 400),
    ("huge max_tokens", json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "x"}],
                                    "max_tokens": 10**9}).encode(), 400),
    ("over-long prompt", json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "word " * 9000}]}).encode(), 400),
    ("oversized body", b"{" + b" " * (5 * 1024 * 1024) + b"}", 413),
    ("non-utf8", b'{"model": "\xff\xfe"}', 400),
]


async def run(base: str, n_requests: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"valid": 0, "valid_ok": 0, "cancelled": 0, "malformed": 0, "malformed_ok": 0}
    failures: list[str] = []
    statuses: dict[int, int] = {}
    next_id = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def valid(kind: float) -> None:
            counts["valid"] += 1
            stream = kind < 0.5
            max_tokens = rng.randint(1, 48)
            if rng.random() < 0.8:
                path = "/v1/chat/completions"
                body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": f"Question {rng.random()}"}],
                        "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream,
                        "n": rng.choice([1, 1, 1, 2]), "stop": rng.choice([None, ["\n"], "the"])}
            else:
                path = "/v1/completions"
                body = {"model": "openchat_3.5", "prompt": f"Once upon a time {rng.random()}", "max_tokens": max_tokens,
                        "stream": stream}
            if stream:
                async with client.stream("POST", base + path, json=body) as r:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    lines = [line async for line in r.aiter_lines() if line]
                finishes = sum(1 for line in lines if line.startswith("data: {") and
                               any(c.get("finish_reason") for c in json.loads(line[6:]).get("choices", [])))
                ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"] and finishes == body.get("n", 1)
            else:
                r = await client.post(base + path, json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                ok = r.status_code == 200 and all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
            if ok:
                counts["valid_ok"] += 1
            else:
                failures.append(f"valid {path} stream={stream}: HTTP {r.status_code}")

        async def cancelled() -> None:
            counts["cancelled"] += 1
            body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": "Tell me a long story"}],
                    "max_tokens": 400, "stream": rng.random() < 0.7, "extra": 1}
            if body["stream"]:
                async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    stop_after = rng.randint(0, 10)
                    i = 0
                    async for _ in r.aiter_lines():
                        i += 1
                        if i > stop_after:
                            break        # leaving the block closes the connection mid-stream
            else:
                try:
                    await asyncio.wait_for(client.post(base + "/v1/chat/completions", json=body),
                                           timeout=rng.uniform(0.01, 0.5))
                except asyncio.TimeoutError:
                    pass

        async def malformed() -> None:
            counts["malformed"] += 1
            name, payload, expected = rng.choice(MALFORMED)
            r = await client.post(base + "/v1/chat/completions", content=payload,
                                  headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            try:
                err = r.json()["error"]
                shaped = set(err) == {"message", "type", "param", "code"}
            except Exception:
                shaped = False
            if r.status_code == expected and shaped:
                counts["malformed_ok"] += 1
            else:
                failures.append(f"malformed {name}: HTTP {r.status_code} (expected {expected}) {r.text[:120]}")

        async def worker() -> None:
            for i in next_id:
                if i and i % 250 == 0:
                    print(f"  {i}/{n_requests} requests sent, {len(failures)} failures so far", flush=True)
                kind = rng.random()
                try:
                    if kind < 0.8:
                        await valid(kind / 0.8)
                    elif kind < 0.9:
                        await cancelled()
                    else:
                        await malformed()
                except Exception as e:
                    failures.append(f"client error: {type(e).__name__}: {e}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"counts": counts, "statuses": dict(sorted(statuses.items())), "failures": failures[:20],
            "n_failures": len(failures), "seconds": round(elapsed, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--model", help="model directory (default: a fresh tiny model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    ap.add_argument("--out", help="write the figures here (JSON)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ochat-load-"))
    model = args.model
    if model is None:
        from ochat.models.tiny import make_tiny_model

        model = str(make_tiny_model(work / "tiny", "mistral-common", "openchat_3.5"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ochat", "serve", "--model", model, "--port", str(port),
                             "--max-num-seqs", str(args.concurrency), "--disable-log-requests", "--disable-log-stats"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print("server did not start:", (work / "server.log").read_text()[-1000:])
                return 1
            time.sleep(0.3)
        # Warm up, then take the memory baseline.
        asyncio.run(run(base, 64, 16, args.seed + 1))
        rss_before = rss_mib(proc.pid)
        result = asyncio.run(asyncio.wait_for(run(base, args.requests, args.concurrency, args.seed), args.timeout))
        # No leaked slots: cancelled requests must leave the batch promptly.
        deadline = time.monotonic() + 15
        while True:
            text = httpx.get(base + "/metrics").text
            running, waiting = metric(text, "ochat_num_requests_running"), metric(text, "ochat_num_requests_waiting")
            if (running == 0 and waiting == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rss_after = rss_mib(proc.pid)
        server_alive = proc.poll() is None and httpx.get(base + "/health").status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    c = result["counts"]
    five_xx = sum(v for k, v in result["statuses"].items() if k >= 500)
    checks = {
        "zero 5xx": five_xx == 0,
        "every valid request answered": c["valid_ok"] == c["valid"],
        "malformed requests get 4xx in OpenAI's shape": c["malformed_ok"] == c["malformed"],
        "no leaked slots (0 running, 0 waiting)": running == 0 and waiting == 0,
        "server still healthy": server_alive,
    }
    summary = {**result, "requests": args.requests, "concurrency": args.concurrency,
               "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
               "rss_growth_mib": round(rss_after - rss_before, 1), "running_after": running, "waiting_after": waiting,
               "checks": checks}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
