"""Load and fault test for `ochat serve` (loopback only, bounded in time).

    python benchmarks/serve_load_test.py [--requests 2000] [--concurrency 64] [--rounds 3] [--no-kill] [--model DIR]

Starts `ochat serve` on the tiny model as a separate process, then runs `--rounds` rounds of `--requests`
requests from `--concurrency` clients: valid chat/completion requests (streaming or not), requests the client
cancels midway (closes the connection), malformed ones (bad JSON, bad fields, unknown model, over-long prompt,
oversized body) and adversarial ones (the probes of issue 13: huge seed, temperature 1e-300, huge top_k, a lone
surrogate, JSON nested 100,000 deep, a 5,000-digit n, text/plain with a foreign Origin, a foreign Host,
700,000 prompts). Halfway through the first round the engine process is killed (kill -9).

Checks: zero 5xx except the 503s of requests in flight at the kill; every other valid request answered
completely; malformed and adversarial ones answered as expected (4xx in OpenAI's error shape, or a full
answer where the request is valid); the engine back (/health 200) after the kill; no leaked batch slots after
each round (/metrics: 0 running, 0 waiting); the server's resident memory (API and engine processes) after
each round. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"content-type": "application/json"}
FOUR_XX = set(range(400, 500))


def _chat(**fields) -> bytes:
    return json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "x"}], **fields}).encode()


def _completion(**fields) -> bytes:
    return json.dumps({"model": "openchat_3.5", "prompt": "hi", "max_tokens": 2, **fields}).encode()


# (name, path, body, headers, accepted statuses). 200 is accepted only where the request is valid for OpenAI's
# API and the engine must simply cope (it is then checked to be a complete answer).
MALFORMED = [
    ("bad json", CHAT, b'{"model": "openchat_3.5", "messages": [', JSON, {400}),
    ("not an object", CHAT, b'[1, 2, 3]', JSON, {400}),
    ("no messages", CHAT, json.dumps({"model": "openchat_3.5"}).encode(), JSON, {400}),
    ("bad role", CHAT, json.dumps({"model": "openchat_3.5", "messages": [{"role": "robot", "content": "x"}]}).encode(),
     JSON, {400}),
    ("bad temperature", CHAT, _chat(temperature="hot"), JSON, {400}),
    ("unknown model", CHAT, json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(),
     JSON, {404}),
    ("huge n", CHAT, _chat(n=10**6), JSON, {400}),
    ("huge max_tokens", CHAT, _chat(max_tokens=10**9), JSON, {400}),
    ("over-long prompt", CHAT, json.dumps({"model": "openchat_3.5", "messages": [{"role": "user", "content": "word " * 9000}]}).encode(),
     JSON, {400}),
    ("oversized body", CHAT, b"{" + b" " * (5 * 1024 * 1024) + b"}", JSON, {413}),
    ("non-utf8", CHAT, b'{"model": "\xff\xfe"}', JSON, {400}),
]
ADVERSARIAL = [     # issue 13's probes
    ("seed 2**64", COMPLETIONS, _completion(seed=2**64), JSON, {200, 400}),
    ("temperature 1e-300", COMPLETIONS, _completion(temperature=1e-300), JSON, {200}),
    ("top_k 10**9", COMPLETIONS, _completion(top_k=10**9, temperature=1.0), JSON, {200, 400}),
    ("lone surrogate", CHAT, b'{"model": "openchat_3.5", "messages": [{"role": "user", "content": "\\ud800"}]}',
     JSON, {400}),
    ("JSON nested 100,000 deep", CHAT, b'{"model": "openchat_3.5", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     JSON, {400}),
    ("5,000-digit n", CHAT, b'{"model": "openchat_3.5", "messages": [{"role": "user", "content": "x"}], "n": '
     + b"9" * 5000 + b"}", JSON, {400}),
    ("text/plain, foreign Origin", CHAT, _chat(max_tokens=2), {"content-type": "text/plain",
                                                               "origin": "https://evil.example"}, {415}),
    ("foreign Host", CHAT, _chat(max_tokens=2), {**JSON, "host": "evil.example"}, FOUR_XX),
    ("700,000 prompts", COMPLETIONS, _completion(prompt=["a"] * 700_000), JSON, {400, 413}),
]


class Round:
    """The outcome of one round of requests."""

    def __init__(self):
        self.counts = {"valid": 0, "valid_ok": 0, "valid_503_at_kill": 0, "cancelled": 0,
                       "malformed": 0, "malformed_ok": 0, "adversarial": 0, "adversarial_ok": 0}
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        # 503s (HTTP status, or an error event in a stream): (start, end, what, as HTTP status), judged after the kill
        self.unavailable: list[tuple[float, float, str, bool]] = []
        self.allowed_503 = 0
        self.kill: dict | None = None

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1

    def judge_unavailable(self, grace_s: float = 1.0) -> None:
        """503s are fine for requests in flight at the kill (started before it was noticed, not done before it)."""
        t_kill = self.kill["t"] if self.kill else None
        for start, end, what, http in self.unavailable:
            if t_kill is not None and start < t_kill + grace_s and end >= t_kill:
                self.counts["valid_503_at_kill"] += what.startswith("valid")
                self.allowed_503 += http
            else:
                self.failures.append(f"{what}: 503 outside the kill")

    def five_xx_outside_kill(self) -> int:
        return sum(v for k, v in self.statuses.items() if k >= 500) - self.allowed_503


async def _valid(client: httpx.AsyncClient, base: str, rng: random.Random, out: Round) -> None:
    out.counts["valid"] += 1
    stream = rng.random() < 0.5
    n = rng.choice([1, 1, 1, 2])
    if rng.random() < 0.8:
        path = CHAT
        body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": f"Question {rng.random()}"}],
                "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream,
                "n": n, "stop": rng.choice([None, ["\n"], "the"])}
    else:
        path, n = COMPLETIONS, 1
        body = {"model": "openchat_3.5", "prompt": f"Once upon a time {rng.random()}",
                "max_tokens": rng.randint(1, 48), "stream": stream}
    start = time.monotonic()
    if stream:
        async with client.stream("POST", base + path, json=body) as r:
            out.status(r.status_code)
            lines = [line async for line in r.aiter_lines() if line]
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        errors = [e["error"] for e in events if "error" in e]
        finishes = sum(1 for e in events for c in e.get("choices", []) if c.get("finish_reason"))
        ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"] and finishes == n and not errors
        unavailable = r.status_code == 503 or any(e.get("type") == "service_unavailable_error" for e in errors)
    else:
        r = await client.post(base + path, json=body)
        out.status(r.status_code)
        ok = r.status_code == 200 and all(c["finish_reason"] in ("stop", "length") for c in r.json()["choices"])
        unavailable = r.status_code == 503
    if ok:
        out.counts["valid_ok"] += 1
    elif unavailable:
        out.unavailable.append((start, time.monotonic(), f"valid {path} stream={stream}", r.status_code == 503))
    else:
        out.failures.append(f"valid {path} stream={stream}: HTTP {r.status_code}")


async def _cancelled(client: httpx.AsyncClient, base: str, rng: random.Random, out: Round) -> None:
    out.counts["cancelled"] += 1
    body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 400, "stream": rng.random() < 0.7, "extra": 1}
    start = time.monotonic()
    if body["stream"]:
        async with client.stream("POST", base + CHAT, json=body) as r:
            out.status(r.status_code)
            stop_after = rng.randint(0, 10)
            i = 0
            async for _ in r.aiter_lines():
                i += 1
                if i > stop_after:
                    break        # leaving the block closes the connection mid-stream
    else:
        try:
            r = await asyncio.wait_for(client.post(base + CHAT, json=body), timeout=rng.uniform(0.01, 0.5))
            out.status(r.status_code)
        except asyncio.TimeoutError:
            return
    if r.status_code == 503:
        out.unavailable.append((start, time.monotonic(), "cancelled", True))


async def _refused(client: httpx.AsyncClient, base: str, rng: random.Random, out: Round, kind: str) -> None:
    """A malformed or adversarial request: the accepted status, errors in OpenAI's shape."""
    out.counts[kind] += 1
    name, path, payload, headers, accepted = rng.choice(MALFORMED if kind == "malformed" else ADVERSARIAL)
    start = time.monotonic()
    r = await client.post(base + path, content=payload, headers=headers)
    out.status(r.status_code)
    if r.status_code == 503 and 200 in accepted:       # a valid request, in flight at the kill
        out.counts[f"{kind}_ok"] += 1
        out.unavailable.append((start, time.monotonic(), f"{kind} {name}", True))
        return
    try:
        data = r.json()
        shaped = (r.status_code == 200 and all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
                  or set(data["error"]) == {"message", "type", "param", "code"})
    except Exception:
        shaped = False
    if r.status_code in accepted and shaped:
        out.counts[f"{kind}_ok"] += 1
    else:
        out.failures.append(f"{kind} {name}: HTTP {r.status_code} (expected {sorted(accepted)[:3]}) {r.text[:120]}")


def engine_pid(server_pid: int) -> int | None:
    """The server's child running the engine process."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if "ochat.serving.engine.process_engine" in Path(f"/proc/{child}/cmdline").read_text():
                    return int(child)
            except OSError:
                pass
    return None


async def kill_engine(client: httpx.AsyncClient, base: str, server_pid: int, out: Round) -> None:
    """kill -9 the engine process; time until /health is 200 again (having seen it 503 while restarting)."""
    pid = engine_pid(server_pid)
    os.kill(pid, signal.SIGKILL)
    t = time.monotonic()
    out.kill = {"t": t, "pid": pid}
    seen_restarting = False
    while time.monotonic() - t < 120:
        try:
            r = await client.get(base + "/health", timeout=5)
            seen_restarting |= r.status_code == 503
            if r.status_code == 200 and seen_restarting:
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    out.kill.update(back_after_s=round(time.monotonic() - t, 2), seen_restarting=seen_restarting,
                    new_pid=engine_pid(server_pid))


async def run(base: str, n_requests: int, concurrency: int, seed: int, server_pid: int | None = None) -> Round:
    """One round; with `server_pid`, kill its engine process halfway through."""
    rng = random.Random(seed)
    out = Round()
    next_id = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    kill_task = None
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal kill_task
            for i in next_id:
                if i and i % 250 == 0:
                    print(f"  {i}/{n_requests} requests sent, {len(out.failures)} failures so far", flush=True)
                if server_pid is not None and i == n_requests // 2:
                    kill_task = asyncio.ensure_future(kill_engine(client, base, server_pid, out))
                kind = rng.random()
                try:
                    if kind < 0.8:
                        await _valid(client, base, rng, out)
                    elif kind < 0.9:
                        await _cancelled(client, base, rng, out)
                    else:
                        await _refused(client, base, rng, out, "malformed" if kind < 0.95 else "adversarial")
                except Exception as e:
                    out.failures.append(f"client error: {type(e).__name__}: {e}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if kill_task is not None:
            await kill_task
        out.seconds = round(time.perf_counter() - start, 1)
    out.judge_unavailable()
    return out


def slots_after(base: str, timeout_s: float = 15) -> tuple[float, float]:
    """(running, waiting) once the batch drained (cancelled requests must leave it promptly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(base + "/metrics").text
        running, waiting = metric(text, "ochat_num_requests_running"), metric(text, "ochat_num_requests_waiting")
        if (running == 0 and waiting == 0) or time.monotonic() > deadline:
            return running, waiting
        time.sleep(0.2)


def start_server(model: str, port: int, concurrency: int, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ochat", "serve", "--model", model, "--port", str(port),
                             "--max-num-seqs", str(concurrency), "--disable-log-requests", "--disable-log-stats"],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start: " + log_path.read_text()[-1000:])
        time.sleep(0.3)


def run_rounds(args, base: str, proc: subprocess.Popen) -> dict:
    asyncio.run(run(base, 64, 16, args.seed + 1))          # warm-up, then the memory baseline
    summary = {"rss_mib_after_warmup": round(rss_mib(proc.pid), 1), "rounds": []}
    for k in range(args.rounds):
        kill = proc.pid if (k == 0 and not args.no_kill) else None
        r = asyncio.run(asyncio.wait_for(run(base, args.requests, args.concurrency, args.seed + 10 * k, kill),
                                         args.timeout))
        running, waiting = slots_after(base)
        summary["rounds"].append({
            "seconds": r.seconds, "counts": r.counts, "statuses": dict(sorted(r.statuses.items())),
            "five_xx_outside_kill": r.five_xx_outside_kill(), "n_failures": len(r.failures),
            "failure_kinds": dict(collections.Counter(re.sub(r"(HTTP \d+).*", r"\1", f)[:90] for f in r.failures)),
            "failures": r.failures[:20], "kill": {k: v for k, v in (r.kill or {}).items() if k != "t"} or None,
            "running_after": running, "waiting_after": waiting, "rss_mib_after": round(rss_mib(proc.pid), 1)})
        print(json.dumps(summary["rounds"][-1]), flush=True)
    summary["server_alive"] = proc.poll() is None and httpx.get(base + "/health").status_code == 200
    return summary


def checks_of(summary: dict, kill: bool) -> dict[str, bool]:
    rounds = summary["rounds"]
    c = [r["counts"] for r in rounds]
    checks = {
        "zero 5xx except the 503s in flight at the kill": all(r["five_xx_outside_kill"] == 0 for r in rounds),
        "every other valid request answered in full": all(x["valid_ok"] + x["valid_503_at_kill"] == x["valid"] for x in c),
        "malformed requests get their 4xx in OpenAI's shape": all(x["malformed_ok"] == x["malformed"] for x in c),
        "adversarial requests refused (or answered in full where valid)": all(
            x["adversarial_ok"] == x["adversarial"] for x in c),
        "no leaked slots after each round (0 running, 0 waiting)": all(
            r["running_after"] == 0 and r["waiting_after"] == 0 for r in rounds),
        "server healthy at the end": summary["server_alive"],
    }
    if kill:
        k = rounds[0]["kill"]
        checks["engine back after the kill (/health said restarting, then ok; a new engine process)"] = bool(
            k and k["seen_restarting"] and k["back_after_s"] < 120 and k["new_pid"] not in (None, k["pid"]))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="consecutive rounds (memory must plateau)")
    ap.add_argument("--no-kill", action="store_true", help="do not kill the engine process in the first round")
    ap.add_argument("--model", help="model directory (default: a fresh tiny model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="give up on a round after this many seconds")
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
    proc = start_server(model, port, args.concurrency, work / "server.log")
    try:
        summary = run_rounds(args, f"http://127.0.0.1:{port}", proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    summary.update(requests=args.requests, concurrency=args.concurrency, checks=checks_of(summary, not args.no_kill))
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
