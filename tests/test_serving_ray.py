"""`ochat serve --ray`: the OpenAI API on Ray Serve replicas, as a real `ochat serve` process that starts its
own small Ray instance (one per module: 2 CPUs, no dashboard), checked with real HTTP clients.

Both tests share the one deployment of 2 replicas of the tiny model (Ray start-up and two model loads
are most of the time)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import ray  # noqa: F401 - a test dependency (the `test` extra): missing, this module fails rather than skips

from ochat.serving.ray_app import REPLICA_HEADER

PROMPTS = [f"Tell me about the number {i}." for i in range(8)]
MAX_TOKENS = 12
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_server_answers(tiny_model) -> dict[str, str]:
    """Greedy answers of a plain single server (no Ray) to every prompt."""
    import openai

    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), dtype="float32") as server:      # fp32: greedy exact under any batching
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        return {p: client.chat.completions.create(model=server.model_name, max_tokens=MAX_TOKENS, temperature=0,
                                                  messages=[{"role": "user", "content": p}]).choices[0].message.content
                for p in PROMPTS}


@pytest.fixture(scope="module")
def ray_server(tiny_model, tmp_path_factory):
    """`ochat serve --ray --replicas 2` as a process of its own, and (computed while Ray starts) the single
    server's answers to compare with."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ochat", "serve", "--model", str(tiny_model), "--ray",
                                 "--replicas", "2", "--port", str(port), "--max-num-seqs", "32", "--dtype", "float32",
                                 "--disable-log-requests", "--disable-log-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        reference = single_server_answers(tiny_model)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ochat: serving" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ochat serve --ray did not start:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        print(f"ochat serve --ray: 2 replicas up in {time.monotonic() - started:.0f} s")
        yield {"base": base, "proc": proc, "log": log, "reference": reference}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert not replica_pids(proc.pid), "replicas outlived `ochat serve --ray`"


def replica_pids(root: int) -> list[int]:
    """Processes below `root` that are Ray Serve replicas of ochat (Ray names them ray::ServeReplica:...)."""
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                titles[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            if titles.get(c, "").startswith("ray::ServeReplica:ochat"):
                found.append(c)
    return found


async def stream_one(client: httpx.AsyncClient, base: str, prompt: str) -> dict:
    """One streaming chat request: its text, the replica that answered, and when it started and ended."""
    body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    rec = {"prompt": prompt, "start": time.monotonic(), "text": "", "replica": None, "error": None}
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            rec["replica"] = r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            done = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec["error"] = str(event["error"])
                    for c in event.get("choices", []):
                        rec["text"] += c["delta"].get("content") or ""
            if not done and rec["error"] is None:
                rec["error"] = "stream ended without [DONE]"
    except httpx.HTTPError as e:
        rec["error"] = repr(e)
    finally:
        rec["end"] = time.monotonic()
    return rec


def test_64_concurrent_streams_spread_over_2_replicas(ray_server):
    reference = ray_server["reference"]
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[stream_one(client, ray_server["base"], PROMPTS[i % len(PROMPTS)])
                                          for i in range(64)])

    results = asyncio.run(run())
    assert [r["error"] for r in results if r["error"]] == []
    assert all(r["text"] == reference[r["prompt"]] for r in results), "greedy outputs differ from a single server's"
    replicas = {r["replica"] for r in results}
    assert len(replicas) == 2 and None not in replicas, replicas      # both replicas answered
    models = httpx.get(f"{ray_server['base']}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["openchat_3.5"]


def test_killed_replica_fails_only_its_requests_and_comes_back(ray_server):
    reference = ray_server["reference"]
    pids = replica_pids(ray_server["proc"].pid)
    assert len(pids) == 2, pids

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            base = ray_server["base"]
            before = [asyncio.create_task(stream_one(client, base, PROMPTS[i % len(PROMPTS)])) for i in range(32)]
            await asyncio.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            killed_at = time.monotonic()
            after = []
            for i in range(24):           # keep sending while Ray notices the death and replaces the replica
                after.append(asyncio.create_task(stream_one(client, base, PROMPTS[i % len(PROMPTS)])))
                await asyncio.sleep(0.1)
            return killed_at, await asyncio.gather(*before), await asyncio.gather(*after)

    killed_at, before, after = asyncio.run(run())
    assert [r["error"] for r in after if r["error"]] == []
    assert all(r["text"] == reference[r["prompt"]] for r in after)
    failed = [r for r in before if r["error"]]
    in_flight = [r for r in before if r["end"] >= killed_at]
    assert len(failed) <= len(in_flight)
    # Only the killed replica's requests failed: a failure names that replica (or none: its response had not
    # started, so Ray's proxy answered), never one that answers after the kill.
    dead = {r["replica"] for r in failed} - {None}
    assert len(dead) <= 1, dead
    assert not dead & {r["replica"] for r in after}
    # The replica comes back: two replicas again, and a new one answers.
    seen = {r["replica"] for r in before + after if not r["error"]}
    deadline = time.monotonic() + 180
    while True:
        pids_now = replica_pids(ray_server["proc"].pid)
        if len(pids_now) == 2 and pids[0] not in pids_now:
            answers = asyncio.run(_burst(ray_server["base"]))
            if all(not r["error"] for r in answers) and {r["replica"] for r in answers} - seen - dead:
                break
        assert time.monotonic() < deadline, f"no replacement replica: {pids_now}"
        time.sleep(1.0)


async def _burst(base: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*[stream_one(client, base, p) for p in PROMPTS])


def test_bad_replica_flags_are_one_line_errors(tiny_model, capsys):
    from ochat.cli import main

    for flags, message in ((["--ray", "--replicas", "2", "--max-replicas", "3"], "either --replicas"),
                           (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--max-replicas 2"),
                           (["--replicas", "2"], "--replicas: only with --ray")):
        assert main(["serve", "--model", str(tiny_model), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_replica_flags_make_valid_ray_serve_deployments():
    """The options each flag combination gives are accepted by Ray Serve's own deployment schema."""
    from ray import serve

    from ochat.serving.ray_app import _deployment, replica_options
    from ochat.serving.served_model import ServeConfig

    fixed = replica_options(ServeConfig(model="m", replicas=3))
    scaled = replica_options(ServeConfig(model="m", min_replicas=0, max_replicas=4, max_num_seqs=16))
    tp = replica_options(ServeConfig(model="m", engine="vllm", tensor_parallel_size=4, replicas=2))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 64
    auto = scaled["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (0, 4, 16)
    assert len(tp["placement_group_bundles"]) == 4 and tp["placement_group_strategy"] == "STRICT_PACK"
    for options in (fixed, scaled, tp):
        _deployment(serve).options(**options)          # Serve's own validation raises on a bad option
