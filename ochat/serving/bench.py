"""`ochat bench serve`: ochat serve (transformers and vLLM engines) vs vLLM's own server vs `transformers serve`
(with and without --continuous-batching) vs one `generate` at a time, on the same model directory and
ShareGPT-like prompts, with streaming clients. vLLM runs from its own virtualenv (`--vllm-python`).

Each server runs as its own process group on loopback, all started at once, but only the one measured runs (the
others are stopped with SIGSTOP until their turn: an idle server still polls); for each concurrency level the
servers take turns, `repeats` passes, every other one in reverse order, so that a change in the machine's load
falls on all alike: in a pass `concurrency` clients each send `rounds` streaming chat requests back to back (and
stop launching new ones after `level_timeout` s). Reported per server and level, pooled over the passes: output
tokens/s, requests/s, time to first token and time per output token (p50/p99), and the ratio to vLLM's server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

SHAREGPT = Path(__file__).resolve().parents[3] / "shared" / "data" / "fastchat" / "dummy_conversation.json"


def sharegpt_prompts(n: int = 256, max_chars: int = 600) -> list[str]:
    """First user turns of FastChat's ShareGPT-format sample (synthetic questions when it is absent)."""
    path = Path(os.environ.get("OCHAT_SHARED_DATA", SHAREGPT.parents[1])) / "fastchat" / "dummy_conversation.json"
    prompts: list[str] = []
    if path.exists():
        for conv in json.loads(path.read_text()):
            turns = conv.get("conversations") or []
            if turns and turns[0].get("from") == "human" and turns[0].get("value"):
                prompts.append(turns[0]["value"][:max_chars])
    if not prompts:
        prompts = [f"Question {i}: explain topic {i} in a few sentences, with an example." for i in range(64)]
    return [prompts[i % len(prompts)] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _one_request(session, url: str, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}
    start = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        # aiohttp's stream yields lines split on b"\n" only, as SSE wants (not on U+2028 inside JSON strings)
        async for raw in r.content:
            line = raw.rstrip(b"\r\n")
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            for c in data.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    tokens = usage_tokens or chunks
    ttft = (first or end) - start
    return {"tokens": tokens, "ttft": ttft, "e2e": end - start,
            "tpot": (end - (first or end)) / (tokens - 1) if tokens > 1 else float("nan")}


async def _load(base_url: str, model: str, prompts: list[str], concurrency: int, rounds: int, max_tokens: int,
                level_timeout: float, extra: dict) -> tuple[list[dict], list[str], float]:
    """`concurrency` clients, each sending `rounds` streaming requests back to back: (results, errors, seconds).

    The client is aiohttp, as in vLLM's benchmark_serving: httpx's connection pool scans every connection per
    request, and at c = 64 it cost ~98 us of CPU per streamed token against aiohttp's ~37, on the 2 cores the
    servers measured here also need (tiny model, ochat's transformers engine: 6,150 vs 9,890 tok/s)."""
    import aiohttp

    url = base_url + "/chat/completions"
    results: list[dict] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()

        async def worker(w: int) -> None:
            for k in range(rounds):
                if time.perf_counter() - start > level_timeout:
                    return
                try:
                    results.append(await _one_request(session, url, model, prompts[(w * rounds + k) % len(prompts)],
                                                      max_tokens, extra))
                except Exception as e:  # reported, not fatal: a peer server may reject some requests
                    errors.append(f"{type(e).__name__}: {e}"[:200])

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return results, errors, elapsed


def _tokens_per_s(results: list[dict], elapsed: float) -> float:
    return round(sum(r["tokens"] for r in results) / elapsed, 1) if elapsed else 0.0


def _summary(concurrency: int, results: list[dict], errors: list[str], elapsed: float) -> dict:
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": round(elapsed, 2),
            "output_tokens_per_s": _tokens_per_s(results, elapsed), "requests_per_s": round(len(results) / elapsed, 3),
            "ttft_p50_ms": round(_pct(ttft, 50) * 1000, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1000, 1),
            "tpot_p50_ms": round(_pct(tpot, 50) * 1000, 2), "tpot_p99_ms": round(_pct(tpot, 99) * 1000, 2)}


async def _run_level(base_url: str, model: str, prompts: list[str], concurrency: int, rounds: int, max_tokens: int,
                     level_timeout: float, extra: dict) -> dict:
    return _summary(concurrency, *await _load(base_url, model, prompts, concurrency, rounds, max_tokens,
                                              level_timeout, extra))


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def _start_server(spec: dict, log_dir: Path, start_timeout: float) -> subprocess.Popen:
    """Start one server (`spec`: name, cmd, env, ready_url) and wait until it answers; its output goes to a log."""
    spec["log"] = log_dir / f"{spec['name'].replace(' ', '_').replace('/', '_')}.log"
    with open(spec["log"], "w") as log:
        # Its own process group (stopped with killpg), but the bench's session: with the kernel's autogroup
        # scheduling (Linux default) a new session is a scheduling group of its own, and on a small machine a
        # server's API process then starves beside its engine's spinning processes (stalls of seconds, seen
        # for ochat's and vLLM's servers alike) instead of sharing the CPU with the client like any process.
        proc = subprocess.Popen(spec["cmd"], env=spec["env"], stdout=log, stderr=subprocess.STDOUT,
                                process_group=0)
    started = time.monotonic()
    try:
        _wait_ready(proc, spec["ready_url"], timeout=start_timeout)
    except Exception:
        _stop_server(proc)
        raise
    spec["ready_s"] = round(time.monotonic() - started, 1)
    spec["pgid"] = proc.pid
    return proc


def _run_alone(specs: list[dict], current: dict) -> None:
    """Only `current`'s processes run during its pass; the other servers' process groups are stopped (SIGSTOP)
    until their turn. An idle server is not quite idle (vLLM's idle worker polls: ~1.5% CPU, waking often): with
    both vLLM servers idle beside it the transformers engine served the tiny model at c = 1 at 433 tok/s, with
    them stopped at 470 (mean of 6 passes each, alternating)."""
    for spec in specs:
        if spec is not current:
            _signal_group(spec, signal.SIGSTOP)
    if _signal_group(current, signal.SIGCONT):
        time.sleep(0.5)         # its timers and polls, due while it was stopped, run before the load starts


def _signal_group(spec: dict, sig: signal.Signals) -> bool:
    """Send `sig` to a started server's process group; False if it is gone (its requests then fail and are
    reported as errors)."""
    try:
        os.killpg(spec["pgid"], sig)
        return True
    except ProcessLookupError:
        return False


def _stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGCONT)     # a stopped server handles its SIGTERM once continued
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)


def _measure(specs: list[dict], prompts: list[str], levels: list[int], rounds: int, repeats: int, max_tokens: int,
             level_timeout: float) -> dict[str, list[dict]]:
    """Per level, `repeats` passes over the running servers in turn, every other pass in reverse order (A B C,
    C B A, ...: a steady drift of the machine's speed falls on every pair of servers alike, and no server always
    runs right after the same other one); each server's passes are pooled into one row per level, which also
    keeps each pass's output tok/s (`pass_tokens_per_s`, for ratios pass by pass)."""
    rows: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    for c in levels:
        pooled = {s["name"]: ([], [], 0.0) for s in specs}
        passes: dict[str, list[float]] = {s["name"]: [] for s in specs}
        for rep in range(repeats):
            for spec in (specs if rep % 2 == 0 else specs[::-1]):
                _run_alone(specs, spec)
                res, err, secs = asyncio.run(_load(spec["base_url"], spec["model"], prompts, c, rounds, max_tokens,
                                                   level_timeout, spec["extra"]))
                old = pooled[spec["name"]]
                pooled[spec["name"]] = (old[0] + res, old[1] + err, old[2] + secs)
                passes[spec["name"]].append(_tokens_per_s(res, secs))
        for spec in specs:
            row = {**_summary(c, *pooled[spec["name"]]), "pass_tokens_per_s": passes[spec["name"]]}
            print(f"  {spec['name']:40s} c={c:<3d} {row['output_tokens_per_s']:8.1f} tok/s  {row['requests']:4d} req "
                  f"TTFT p50 {row['ttft_p50_ms']:8.1f} ms  TPOT p50 {row['tpot_p50_ms']:7.2f} ms  errors "
                  f"{row['errors']}", flush=True)
            rows[spec["name"]].append(row)
    return rows


def bench_servers(specs: list[dict], prompts: list[str], levels: list[int], rounds: int, max_tokens: int,
                  level_timeout: float, log_dir: Path, repeats: int = 1, together: bool = False,
                  start_timeout: float = 600) -> list[dict]:
    """Measure servers on the same load. `together`: all run at once and take turns level by level (fair on a
    machine whose load changes); otherwise one after the other (e.g. on one GPU, where each sizes its KV cache
    from the free memory). A server that fails to start is reported with its log's tail."""
    groups = [specs] if together else [[s] for s in specs]
    results = {}
    for group in groups:
        procs, running = [], []
        try:
            for spec in group:
                try:
                    procs.append(_start_server(spec, log_dir, start_timeout))
                    running.append(spec)
                    # Warm-up (transformers serve loads the model at the first request; vLLM compiles shapes).
                    for c in (1, min(8, max(levels))):
                        asyncio.run(_run_level(spec["base_url"], spec["model"], prompts, c, 1, 4, 600, spec["extra"]))
                except Exception as e:
                    tail = spec["log"].read_text()[-600:] if spec.get("log") and spec["log"].exists() else ""
                    print(f"  {spec['name']}: could not run: {e}\n{tail}", flush=True)
                    results[spec["name"]] = {"error": f"{e}: {tail[-300:]}", "levels": []}
            if running:
                for name, rows in _measure(running, prompts, levels, rounds, repeats, max_tokens, level_timeout).items():
                    results[name] = {"levels": rows}
        finally:
            for proc in procs:
                _stop_server(proc)
    return [{"name": s["name"], "command": " ".join(s["cmd"]), "ready_s": s.get("ready_s"), **results[s["name"]]}
            for s in specs]


def _sequential_baseline(model_dir: Path, prompts: list[str], n: int, max_tokens: int) -> dict:
    """One `model.generate` at a time in this process (greedy, fixed output length), one thread as ochat uses."""
    import torch
    from transformers import AutoModelForCausalLM

    from ochat.models.tokenizers import load_tokenizer
    from ochat.templates import ConversationEncoder, conversation_from_openai

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = load_tokenizer(str(model_dir))
    enc = ConversationEncoder("openchat_3.5", tok)
    ids = [enc.encode_one(conversation_from_openai([{"role": "user", "content": p}]), inference=True)[0]
           for p in prompts[:n]]
    model.generate(torch.tensor([ids[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    tokens, e2e = 0, []
    start = time.perf_counter()
    for x in ids:
        t = time.perf_counter()
        out = model.generate(torch.tensor([x]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0)
        e2e.append(time.perf_counter() - t)
        tokens += out.shape[1] - len(x)
    elapsed = time.perf_counter() - start
    row = {"concurrency": 1, "requests": n, "errors": 0, "seconds": round(elapsed, 2),
           "output_tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(n / elapsed, 3),
           "e2e_p50_ms": round(statistics.median(e2e) * 1000, 1)}
    print(f"  {'sequential generate':32s} c=1   {row['output_tokens_per_s']:8.1f} tok/s  {n:4d} req", flush=True)
    return {"name": "sequential generate", "command": "model.generate(one prompt at a time)", "levels": [row]}


# The servers `--servers` can name, and the name each gets in the results.
SERVERS = {"ochat-transformers": "ochat serve --engine transformers", "ochat-vllm": "ochat serve --engine vllm",
           "vllm": "vLLM (its own server)", "transformers-cb": "transformers serve --continuous-batching",
           "transformers": "transformers serve", "sequential": "sequential generate",
           "ochat-ray-1": "ochat serve --ray --replicas 1", "ochat-ray-2": "ochat serve --ray --replicas 2"}
# Model sizes: the quickstart's model, and a ~243M-parameter one (where the matmuls, not Python, dominate).
SIZES = {"tiny": dict(hidden_size=128, layers=2, heads=4),
         "243m": dict(hidden_size=1024, layers=16, heads=16, kv_heads=8, intermediate_size=2816)}
OCHAT_ROOT = Path(__file__).resolve().parents[2]


def default_vllm_python() -> Path:
    """The Python of vLLM's virtualenv: $OCHAT_VLLM_PYTHON, else .venv-vllm/ of this checkout (`.ci/vllm_venv`)."""
    return Path(os.environ.get("OCHAT_VLLM_PYTHON") or OCHAT_ROOT / ".venv-vllm" / "bin" / "python")


def server_spec(key: str, model: Path, port: int, max_num_seqs: int, vllm_python: Path, env: dict) -> dict:
    """One server of `SERVERS` on 127.0.0.1:`port`: its name, command, environment, URLs and extra request fields."""
    ochat = ["-m", "ochat", "serve", "--model", str(model), "--port", str(port), "--disable-log-requests",
             "--disable-log-stats", "--max-num-seqs", str(max_num_seqs)]
    fixed_length = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    # vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); the venv runs this checkout's ochat.
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "PYTHONPATH": str(OCHAT_ROOT)}
    extra_env, extra, served_name = {}, fixed_length, "openchat_3.5"
    if key == "ochat-transformers":
        cmd = [sys.executable, *ochat, "--engine", "transformers"]
    elif key.startswith("ochat-ray-"):      # Ray Serve replicas of the transformers engine (the `ray` extra)
        cmd = [sys.executable, *ochat, "--engine", "transformers", "--ray", "--replicas", key.rsplit("-", 1)[1]]
    elif key == "ochat-vllm":
        cmd, extra_env = [str(vllm_python), *ochat, "--engine", "vllm"], vllm_env
    elif key == "vllm":
        cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
               "127.0.0.1", "--port", str(port), "--served-model-name", served_name, "--max-num-seqs",
               str(max_num_seqs), "--disable-log-stats", "--disable-uvicorn-access-log"]
        extra_env = vllm_env
    else:
        cli = shutil.which("transformers")
        if cli is None:
            raise RuntimeError("the `transformers` command is not installed")
        cmd = [cli, "serve", str(model), "--port", str(port), "--host", "127.0.0.1"]
        # Its paged KV cache is sized from the free memory unless bounded (it took 11 GB and was OOM-killed beside
        # the other servers): 512 blocks of 32 tokens hold every request of the largest level here.
        cmd += ["--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", "512"] if key == "transformers-cb" else []
        extra, served_name = {}, str(model)
    return {"name": SERVERS[key], "cmd": cmd, "env": {**env, **extra_env}, "extra": extra, "model": served_name,
            "ready_url": f"http://127.0.0.1:{port}/health", "base_url": f"http://127.0.0.1:{port}/v1"}


def bench_serve(
    concurrency: str = typer.Option("1,8,32,64", "--concurrency", help="Comma-separated client counts."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Requests per client per level and pass."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Passes per level over the servers, in turn."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=2, help="Output tokens per request."),
    level_timeout: float = typer.Option(30.0, "--level-timeout", help="Stop launching requests after this many s per pass."),
    servers: str = typer.Option("ochat-transformers,ochat-vllm,vllm,transformers-cb", "--servers",
                                help=f"Comma-separated, in order: {', '.join(SERVERS)}."),
    one_at_a_time: bool = typer.Option(False, "--one-at-a-time", help="Run the servers one after the other "
                                       "(default: all at once, taking turns level by level)."),
    size: str = typer.Option("tiny", "--size", help=f"Model made for the run: {' or '.join(SIZES)} (unless --model)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model directory (default: a fresh random one of --size)."),
    vllm_python: Optional[Path] = typer.Option(None, "--vllm-python", help="Python of vLLM's virtualenv "
                                               "(default: $OCHAT_VLLM_PYTHON or .venv-vllm/bin/python)."),
    out: Path = typer.Option(Path("bench_serve.json"), "--out", help="Where to write the figures (JSON)."),
) -> None:
    """Serving throughput and latency: ochat serve (each engine) vs vLLM's own server vs transformers serve."""
    from ochat.errors import OchatError
    from ochat.utils.atomic import atomic_write_text

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    keys = [k.strip() for k in servers.split(",") if k.strip()]
    bad = [k for k in keys if k not in SERVERS]
    if bad or size not in SIZES:
        raise OchatError(f"--servers {bad[0]}: expected {', '.join(SERVERS)}" if bad else
                         f"--size {size}: expected {' or '.join(SIZES)}")
    vllm_python = vllm_python or default_vllm_python()
    if any(k in ("ochat-vllm", "vllm") for k in keys) and not vllm_python.exists():
        raise OchatError(f"--vllm-python {vllm_python}: not found (make vLLM's virtualenv with .ci/vllm_venv)")
    work = Path(tempfile.mkdtemp(prefix="ochat-bench-serve-"))
    try:
        if model is None:
            from ochat.models.tiny import make_tiny_model

            model = make_tiny_model(work / size, "mistral-common", "openchat_3.5", max_positions=2048, **SIZES[size])
        prompts = sharegpt_prompts()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        print(f"model {model}; levels {levels}; {repeats} passes x {rounds} requests per client; {max_tokens} output "
              f"tokens", flush=True)
        specs = []
        for key in (k for k in keys if k != "sequential"):
            try:
                specs.append(server_spec(key, model, _free_port(), max(levels), vllm_python, env))
            except RuntimeError as e:
                print(f"  {SERVERS[key]}: skipped ({e})", flush=True)
        results = bench_servers(specs, prompts, levels, rounds, max_tokens, level_timeout, work, repeats=repeats,
                                together=not one_at_a_time)
        if "sequential" in keys:
            results.append(_sequential_baseline(model, prompts, 8, max_tokens))
        summary = _ratios(results, levels)
        for line in summary:
            print(line)
        atomic_write_text(out, json.dumps({"results": results, "summary": summary, "model": str(model), "settings": {
            "levels": levels, "rounds": rounds, "repeats": repeats, "max_tokens": max_tokens, "together":
            not one_at_a_time, "level_timeout": level_timeout, "size": size}}, indent=2))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ratios(results: list[dict], levels: list[int]) -> list[str]:
    """Per concurrency: each server's output tok/s as a multiple of vLLM's own server (else the first server),
    pooled over the passes; with several passes also the median of the pass-by-pass ratios, which a pass run
    while the machine was briefly slower (a busy neighbour on the host) moves less."""
    tps = {r["name"]: {row["concurrency"]: row["output_tokens_per_s"] for row in r["levels"]} for r in results}
    per_pass = {r["name"]: {row["concurrency"]: row.get("pass_tokens_per_s") or [] for row in r["levels"]}
                for r in results}
    base = SERVERS["vllm"] if tps.get(SERVERS["vllm"]) else next((n for n in tps if tps[n]), None)

    def paired(name: str, c: int) -> str:
        mine, ref = per_pass[name].get(c, []), per_pass[base].get(c, [])
        if len(mine) < 2 or len(mine) != len(ref) or not all(ref):
            return ""
        return f" (median per pass {statistics.median(m / r for m, r in zip(mine, ref)):.2f}x)"

    lines = []
    for c in levels:
        ref = tps.get(base, {}).get(c)
        if not ref:
            continue
        parts = [f"{name} {by_c[c] / ref:.2f}x{paired(name, c)}" for name, by_c in tps.items()
                 if name != base and by_c.get(c)]
        if parts:
            lines.append(f"c={c}: vs {base} ({ref:.0f} tok/s): " + ", ".join(parts))
    return lines
