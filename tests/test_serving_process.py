"""The server as a real process: the seed-era entry point, JSON-lines log file, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_seed_era_entry_point_log_file_and_sigterm(tiny_model, tmp_path):
    port = free_port()
    log_file = tmp_path / "server.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ochat.serving.openai_api_server", "--model_type", "openchat_3.5",
                             "--model_path", str(tiny_model), "--port", str(port), "--log-file", str(log_file),
                             "--disable-log-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        wait_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        r = client.chat.completions.create(model="openchat_3.5", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
        assert r.choices[0].message.content is not None
        # SIGTERM while a stream runs: the in-flight request is finished (graceful), then the process exits.
        chunks: list = []

        def consume() -> None:
            stream = client.chat.completions.create(model="openchat_3.5", messages=[{"role": "user", "content": "go"}],
                                                    max_tokens=150, stream=True, extra_body={"ignore_eos": True})
            for c in stream:
                chunks.append(c)

        t = threading.Thread(target=consume)
        t.start()
        deadline = time.monotonic() + 30
        while len(chunks) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert len(requests) == 2 and requests[0]["prompt_tokens"] > 0 and requests[0]["finish_reasons"]


def test_ochat_serve_bad_model_dir_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ochat", "serve", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --model") and "Traceback" not in r.stderr


def test_vllm_engine_importable_without_vllm():
    from ochat.serving.engine import pick_engine
    from ochat.serving.engine.vllm_engine import VLLMEngine  # noqa: F401  (imports on any machine)

    try:
        import vllm  # noqa: F401
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        assert pick_engine("auto") == "transformers"
    else:  # pragma: no cover - GPU machines
        pytest.skip("vllm + GPU present: the GPU test suite covers it")


def test_engine_process_exits_with_a_killed_server(tiny_model):
    """The engine runs in its own process; a server killed without any shutdown leaves no orphan behind."""
    code = ("import sys, time\n"
            "from ochat.serving.engine.process_engine import ProcessEngine\n"
            f"e = ProcessEngine({str(tiny_model)!r}, max_num_seqs=2)\n"
            "print(e._proc.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        os.kill(engine_pid, 0)                      # running
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.waitpid(engine_pid, os.WNOHANG)      # not our child: raises; it is reaped by init
        except ChildProcessError:
            pass
        try:
            os.kill(engine_pid, 0)
        except ProcessLookupError:
            return
        if open(f"/proc/{engine_pid}/stat").read().split()[2] == "Z":
            return                                  # exited, waiting for init to reap it
        time.sleep(0.1)
    raise AssertionError(f"engine process {engine_pid} outlived its killed server")


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's child running ochat.serving.engine.process_engine."""
    for task in os.listdir(f"/proc/{server_pid}/task"):
        for child in open(f"/proc/{server_pid}/task/{task}/children").read().split():
            try:
                cmdline = open(f"/proc/{child}/cmdline").read()
            except OSError:
                continue
            if "ochat.serving.engine.process_engine" in cmdline:
                return int(child)
    raise AssertionError("no engine process found")


def test_killed_engine_process_fails_in_flight_requests_and_comes_back(tiny_model):
    """kill -9 of the engine process: the requests in flight get 503, /health says the engine is restarting,
    a new engine process starts and the next requests succeed; /metrics counts the restart."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ochat", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--disable-log-requests", "--disable-log-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    body = {"model": "openchat_3.5", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
            "ignore_eos": True, "temperature": 0}
    try:
        wait_healthy(proc, port)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0)
        first_engine = _engine_pid(proc.pid)
        results: dict = {}

        def stream() -> None:
            try:
                kw = {k: v for k, v in body.items() if k != "ignore_eos"}
                for c in client.chat.completions.create(stream=True, extra_body={"ignore_eos": True}, **kw):
                    results["chunks"] = results.get("chunks", 0) + 1
            except openai.APIError as e:
                results["stream_error"] = e

        def full() -> None:
            results["full"] = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)

        threads = [threading.Thread(target=stream), threading.Thread(target=full)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while results.get("chunks", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(first_engine, signal.SIGKILL)
        health = []
        while time.monotonic() < deadline + 60:
            r = httpx.get(f"{base}/health", timeout=5)
            health.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "engine_restarting"
            elif health.count(503):
                break
            time.sleep(0.05)
        for t in threads:
            t.join(timeout=60)
        assert 503 in health and health[-1] == 200
        assert "stream_error" in results and "retry" in str(results["stream_error"])
        assert results["stream_error"].code == "engine_dead"          # as the full response's error
        assert results["full"].status_code == 503 and results["full"].json()["error"]["code"] == "engine_dead"
        # The new engine serves; the server and its other state are untouched.
        assert _engine_pid(proc.pid) != first_engine
        r = client.chat.completions.create(model="openchat_3.5", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="openchat_3.5", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
            stream=True) if c.choices) == r.choices[0].message.content
        metrics = httpx.get(f"{base}/metrics").text
        assert 'ochat_engine_restarts{model_name="openchat_3.5"} 1.0' in metrics
    finally:
        proc.kill()
        proc.wait()


def test_cpu_threads_reach_the_engine_process(tiny_model):
    """`--cpu-threads` (ServeConfig.cpu_threads) sets the engine process's intra-op threads; by default a model
    under 100M parameters gets one."""
    from ochat.serving.engine.process_engine import ProcessEngine

    for requested, expected in ((2, 2), (None, 1)):
        engine = ProcessEngine(str(tiny_model), max_num_seqs=2, cpu_threads=requested)
        try:
            assert engine.threads == expected
        finally:
            engine.shutdown()
