"""`ochat bench serve`: ochat serve (transformers and vLLM engines) vs vLLM's own server vs `transformers serve`
(with and without --continuous-batching) vs one `generate` at a time, on the same model directory and
ShareGPT-like prompts, with streaming clients. vLLM runs from its own virtualenv (`--vllm-python`).

Each server runs as its own process on loopback; for each concurrency level, `concurrency` clients each send
`rounds` streaming chat requests back to back (a level stops launching new requests after `level_timeout` s).
Reported per level: output tokens/s, requests/s, time to first token and time per output token (p50/p99).
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


async def _sse_lines(response):
    """SSE lines split on "\n" only (str.splitlines would also split inside JSON strings at U+2028 etc.)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8").rstrip("\r")
    if buffer:
        yield buffer.decode("utf-8")


async def _one_request(client, url: str, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}
    start = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in _sse_lines(r):
            if not line.startswith("data: ") or line == "data: [DONE]":
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


async def _run_level(base_url: str, model: str, prompts: list[str], concurrency: int, rounds: int, max_tokens: int,
                     level_timeout: float, extra: dict) -> dict:
    import httpx

    url = base_url + "/chat/completions"
    results: list[dict] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def worker(w: int) -> None:
            for k in range(rounds):
                if time.perf_counter() - start > level_timeout:
                    return
                try:
                    results.append(await _one_request(client, url, model, prompts[(w * rounds + k) % len(prompts)],
                                                      max_tokens, extra))
                except Exception as e:  # reported, not fatal: a peer server may reject some requests
                    errors.append(str(e)[:200])

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": round(elapsed, 2),
            "output_tokens_per_s": round(tokens / elapsed, 1), "requests_per_s": round(len(results) / elapsed, 3),
            "ttft_p50_ms": round(_pct(ttft, 50) * 1000, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1000, 1),
            "tpot_p50_ms": round(_pct(tpot, 50) * 1000, 2), "tpot_p99_ms": round(_pct(tpot, 99) * 1000, 2)}


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


def _bench_server(name: str, cmd: list[str], env: dict, ready_url: str, base_url: str, model: str, prompts: list[str],
                  levels: list[int], rounds: int, max_tokens: int, level_timeout: float, extra: dict,
                  log_dir: Path, start_timeout: float = 600) -> dict:
    log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
    log = open(log_path, "w")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, ready_url, timeout=start_timeout)
        ready_s = round(time.monotonic() - started, 1)
        # Warm-up (transformers serve loads the model at the first request; vLLM compiles a few shapes).
        asyncio.run(_run_level(base_url, model, prompts, 1, 1, 4, 600, extra))
        asyncio.run(_run_level(base_url, model, prompts, min(8, max(levels)), 1, 4, 600, extra))
        rows = []
        for c in levels:
            row = asyncio.run(_run_level(base_url, model, prompts, c, rounds, max_tokens, level_timeout, extra))
            print(f"  {name:32s} c={c:<3d} {row['output_tokens_per_s']:8.1f} tok/s  {row['requests']:4d} req "
                  f"TTFT p50 {row['ttft_p50_ms']:8.1f} ms  TPOT p50 {row['tpot_p50_ms']:7.2f} ms  errors {row['errors']}",
                  flush=True)
            rows.append(row)
        return {"name": name, "command": " ".join(cmd), "ready_s": ready_s, "levels": rows}
    except Exception as e:
        log.flush()
        tail = log_path.read_text()[-600:]
        print(f"  {name}: could not run: {e}\n{tail}", flush=True)
        return {"name": name, "command": " ".join(cmd), "error": f"{e}: {tail[-300:]}", "levels": []}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
           "transformers": "transformers serve", "sequential": "sequential generate"}
# Model sizes: the quickstart's model, and a ~243M-parameter one (where the matmuls, not Python, dominate).
SIZES = {"tiny": dict(hidden_size=128, layers=2, heads=4),
         "243m": dict(hidden_size=1024, layers=16, heads=16, kv_heads=8, intermediate_size=2816)}
OCHAT_ROOT = Path(__file__).resolve().parents[2]


def default_vllm_python() -> Path:
    """The Python of vLLM's virtualenv: $OCHAT_VLLM_PYTHON, else .venv-vllm/ of this checkout (`.ci/vllm_venv`)."""
    return Path(os.environ.get("OCHAT_VLLM_PYTHON") or OCHAT_ROOT / ".venv-vllm" / "bin" / "python")


def server_command(key: str, model: Path, port: int, max_num_seqs: int, vllm_python: Path) -> tuple[list[str], dict, dict]:
    """(command, extra environment, extra request fields) of one server of `SERVERS`, on 127.0.0.1:`port`."""
    ochat = ["-m", "ochat", "serve", "--model", str(model), "--port", str(port), "--disable-log-requests",
             "--disable-log-stats", "--max-num-seqs", str(max_num_seqs)]
    fixed_length = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    # vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); the venv runs this checkout's ochat.
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "PYTHONPATH": str(OCHAT_ROOT)}
    if key == "ochat-transformers":
        return [sys.executable, *ochat, "--engine", "transformers"], {}, fixed_length
    if key == "ochat-vllm":
        return [str(vllm_python), *ochat, "--engine", "vllm"], vllm_env, fixed_length
    if key == "vllm":
        return [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                "127.0.0.1", "--port", str(port), "--served-model-name", "openchat_3.5", "--max-num-seqs",
                str(max_num_seqs), "--disable-log-stats", "--disable-uvicorn-access-log"], vllm_env, fixed_length
    cli = shutil.which("transformers")
    if cli is None:
        raise RuntimeError("the `transformers` command is not installed")
    cmd = [cli, "serve", str(model), "--port", str(port), "--host", "127.0.0.1"]
    return cmd + (["--continuous-batching"] if key == "transformers-cb" else []), {}, {}


def bench_serve(
    concurrency: str = typer.Option("1,8,32,64", "--concurrency", help="Comma-separated client counts."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Requests per client per level."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=2, help="Output tokens per request."),
    level_timeout: float = typer.Option(30.0, "--level-timeout", help="Stop launching requests after this many s per level."),
    servers: str = typer.Option("ochat-transformers,ochat-vllm,vllm,transformers-cb", "--servers",
                                help=f"Comma-separated, in order: {', '.join(SERVERS)}."),
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
        print(f"model {model}; levels {levels}; {rounds} requests per client; {max_tokens} output tokens", flush=True)
        results = []
        for key in keys:
            if key == "sequential":
                results.append(_sequential_baseline(model, prompts, 8, max_tokens))
                continue
            port = _free_port()
            try:
                cmd, extra_env, extra = server_command(key, model, port, max(levels), vllm_python)
            except RuntimeError as e:
                print(f"  {SERVERS[key]}: skipped ({e})", flush=True)
                continue
            results.append(_bench_server(SERVERS[key], cmd, {**env, **extra_env}, f"http://127.0.0.1:{port}/health",
                                         f"http://127.0.0.1:{port}/v1", "openchat_3.5" if key != "transformers-cb"
                                         and key != "transformers" else str(model), prompts, levels, rounds,
                                         max_tokens, level_timeout, extra, work))
        summary = _ratios(results, levels)
        for line in summary:
            print(line)
        atomic_write_text(out, json.dumps({"results": results, "summary": summary, "model": str(model),
                                           "settings": {"levels": levels, "rounds": rounds, "max_tokens": max_tokens,
                                                        "level_timeout": level_timeout, "size": size}}, indent=2))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ratios(results: list[dict], levels: list[int]) -> list[str]:
    """Per concurrency: each server's output tok/s as a multiple of vLLM's own server (else the first server)."""
    tps = {r["name"]: {row["concurrency"]: row["output_tokens_per_s"] for row in r["levels"]} for r in results}
    base = SERVERS["vllm"] if tps.get(SERVERS["vllm"]) else next((n for n in tps if tps[n]), None)
    lines = []
    for c in levels:
        ref = tps.get(base, {}).get(c)
        if not ref:
            continue
        parts = [f"{name} {by_c[c] / ref:.2f}x" for name, by_c in tps.items() if name != base and by_c.get(c)]
        if parts:
            lines.append(f"c={c}: vs {base} ({ref:.0f} tok/s): " + ", ".join(parts))
    return lines
