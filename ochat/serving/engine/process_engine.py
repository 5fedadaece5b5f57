"""The transformers engine in its own process (the vLLM V1 layout): the HTTP process only parses, templates,
detokenizes and streams; the engine process only steps an `EngineCore` (transformers_engine.py).

Why: in one process the HTTP event loop and the engine thread share one GIL, and on a small CPU machine
the engine's many short torch calls each wait for the HTTP side to let the GIL go (measured on the 2-core VM:
the engine alone decodes 32 rows at ~2,700 tokens/s, behind the HTTP layer in the same process at ~750).

Protocol over one socket pair (multiprocessing.connection, pickled tuples), every message small:
  API -> engine: (model_dir, core_options) once, then ("add", request_id, prompt_ids, SamplingParams) |
                 ("abort", request_id) | ("shutdown",)
  engine -> API: ("ready", {"max_model_len": n, "dtype": name, "threads": n}) | ("error", message) once at start, then one
                 ("out", [(request_id, token_ids, logprobs, finish_reason, prompt_logprobs, error), ...], running)
                 per step (not one per token), and ("stopped",) last.
The engine process ignores SIGINT/SIGTERM (the API process shuts it down after its graceful wait) and exits
when the socket closes, so a killed API process leaves no orphan behind.

Supervision: if the engine process dies (a crash, the OOM killer, kill -9), every request in flight raises
`EngineDeadError` (HTTP 503), `state` is "restarting" while a new engine process loads the model (new
requests wait for it), then "ready" again; `restarts` counts the restarts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator

from ochat.errors import OchatError
from ochat.serving.engine import (EngineDeadError, EngineOutput, QueueFullError, SamplingParams, deliver_outputs,
                                  fail_streams, stream_outputs)

log = logging.getLogger("ochat.serving")


class EngineProcess:
    """A started engine process that has not been told its model yet: it imports torch and transformers
    (most of its start-up time) while the caller loads the tokenizer."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        # Socket buffers of 4 MiB, not the default ~200 KiB: a unix socket counts each small write at several
        # times its size, and the engine blocked in send() while the API process's reader thread waited for its
        # GIL (profiled, tiny model, 32 streams: 15% of the engine's time in send; 3,900 -> 6,400 tokens/s served).
        for end in (ours, theirs):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        # A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's __main__).
        self.proc = subprocess.Popen([sys.executable, "-m", "ochat.serving.engine.process_engine", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(ours.detach())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class ProcessEngine:
    """The process client: same interface as `TransformersEngine`, the `EngineCore` lives in a child process
    that is restarted if it dies."""

    def __init__(self, model_dir: str, process: EngineProcess | None = None, start_timeout_s: float = 600.0,
                 max_queue: int = 1024, restart_wait_s: float = 60.0, standby: bool = False, **core_options: Any):
        self.model_dir, self.max_queue, self._options = model_dir, max_queue, core_options
        self.restart_wait_s = restart_wait_s
        self._start_timeout_s = start_timeout_s
        self.state = "starting"            # "ready" | "restarting" | "stopped"
        self.restarts = 0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._running = 0
        self._held = 0                     # new requests waiting for a restarted engine
        self._lock = threading.Lock()      # state changes, request registration and sends
        self._stopped = False
        # A spare process that has imported torch and transformers already: a restart only loads the model
        # (measured on the loaded 2-core VM: 14 s back without it, most of it imports; ~250 MiB resident).
        self._standby: EngineProcess | None = None
        self._use_standby = standby
        info = self._start(process or EngineProcess())
        self.max_model_len: int = info["max_model_len"]
        self.dtype: str = info["dtype"]
        self.threads: int = info["threads"]
        self.state = "ready"
        self._spawn_standby()
        self._supervisor = threading.Thread(target=self._supervise, name="ochat-engine-reader", daemon=True)
        self._supervisor.start()

    # -- the Engine interface (event-loop side) ---------------------------------------------------
    def stats(self) -> dict[str, int]:
        waiting = len(self._streams) + self._held - self._running
        return {"running": self._running, "waiting": max(0, waiting)}

    def can_accept(self, n: int) -> bool:
        return not self._stopped and self.stats()["waiting"] + n <= self.max_queue

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]:
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        await self._until_ready()
        with self._lock:           # atomic with a death: a registered request is failed, a later one waits
            waiting = self.stats()["waiting"]
            if waiting >= self.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
            self._send(("add", request_id, list(prompt_ids), params))
        async for out in stream_outputs(outputs, self._streams, request_id, self.abort):
            yield out

    async def _until_ready(self) -> None:
        """While a new engine process loads, new requests wait for it (up to `restart_wait_s`) rather than
        fail: only the requests in flight at the death see an error."""
        deadline = time.monotonic() + self.restart_wait_s
        self._held += 1
        try:
            while self.state == "restarting" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            self._held -= 1
        if self.state != "ready":
            raise EngineDeadError("the engine is shutting down" if self._stopped else
                                  "the engine process is restarting; retry shortly")

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        with self._lock:
            self._send(("abort", request_id))

    def shutdown(self) -> None:
        """Abort what still runs, stop the engine process (killed if it does not exit within 10 s)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped, self.state = True, "stopped"
            self._send(("shutdown",))
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._standby is not None:
            self._standby.kill()
        self._supervisor.join(timeout=5)
        self._conn.close()

    # -- start, read, restart -----------------------------------------------------------------------
    def _start(self, process: EngineProcess) -> dict:
        """Tell `process` its model, wait for it to load (OchatError if it cannot), then talk to it."""
        proc, conn = process.proc, process.conn
        try:
            conn.send((self.model_dir, self._options))
            deadline = time.monotonic() + self._start_timeout_s
            while not conn.poll(0.2):
                if proc.poll() is not None or time.monotonic() > deadline or self._stopped:
                    raise OchatError(f"the engine process for {self.model_dir} did not start "
                                     f"(exit status {proc.poll()})")
            kind, info = conn.recv()
        except (EOFError, OSError):
            kind, info = "error", "the engine process exited"
        except OchatError:
            process.kill()
            raise
        if kind != "ready":
            process.kill()
            raise OchatError(f"the engine process for {self.model_dir} failed to start: {info}")
        log.info("engine process %d ready (%s, %d threads)", proc.pid, info["dtype"], info["threads"])
        with self._lock:
            self._proc, self._conn = proc, conn
        return info

    def _supervise(self) -> None:
        """Read the engine's outputs; when its process dies, fail what was in flight and start a new one."""
        while True:
            self._read()
            if self._stopped:
                return
            with self._lock:
                self.state, self._running = "restarting", 0
                streams = dict(self._streams)
                self._streams.clear()
                self._conn.close()
            log.error("the engine process %d died (exit status %s) with %d requests in flight; restarting it",
                      self._proc.pid, self._reap(), len(streams))
            fail_streams(streams, EngineDeadError("the engine process died; retry shortly"))
            if not self._restart():
                return

    def _reap(self) -> int | None:
        try:
            return self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:       # its socket closed but it lingers: make sure it is gone
            self._proc.kill()
            return self._proc.wait()

    def _restart(self) -> bool:
        backoff = 1.0
        while not self._stopped:
            process, self._standby = self._standby, None
            try:
                if process is None or process.proc.poll() is not None:
                    process = EngineProcess()
                info = self._start(process)
            except (OchatError, OSError) as e:
                if self._stopped:
                    break
                log.error("restarting the engine failed (%s); next try in %.0f s", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            with self._lock:
                if not self._stopped:
                    self.max_model_len = info["max_model_len"]
                    self.restarts += 1
                    self.state = "ready"
                    self._spawn_standby()
                    return True
            self._kill()            # shut down while it started
        return False

    def _spawn_standby(self) -> None:
        if self._use_standby and not self._stopped:
            try:
                self._standby = EngineProcess()
            except OSError as e:
                log.warning("no standby engine process (%s): a restart will take longer", e)

    def _read(self) -> None:
        """Engine messages -> the requests' queues, one event-loop wake-up per step and loop."""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "stopped":
                    return
                _, items, self._running = msg
                deliver_outputs(self._streams, [(rid, EngineOutput(*rest)) for rid, *rest in items])
        except (EOFError, OSError):
            return

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError):      # the engine process is gone; the supervisor fails its requests
            pass

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()


# -- the engine process ---------------------------------------------------------------------------------
def _engine_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the API process decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="ochat engine: %(message)s")
    conn = Connection(fd)
    try:
        # transformers.modeling_utils is most of a model's load time (7 of 8 s for the tiny model on the
        # loaded VM, imported lazily by from_pretrained): import it before the model is even named.
        import transformers.modeling_utils  # noqa: F401

        from ochat.serving.engine.transformers_engine import EngineCore
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        model_dir, options = conn.recv()
    except EOFError:
        return
    try:
        core = EngineCore(model_dir, **options)
    except Exception as e:  # reported to the API process, which raises it as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"max_model_len": core.max_model_len, "dtype": core.dtype, "threads": core.threads}))
    _serve(core, conn)


def _serve(core, conn: Connection) -> None:
    """Receive requests, step, send each step's outputs as one message. An exception out of `step` is a bug
    that may have corrupted the core: it ends this process, and the API process starts a new one."""
    last_running = 0
    while True:
        stopping = False
        try:
            ready = conn.poll(0 if core.has_unfinished_requests() else None)
            while ready:
                msg = conn.recv()
                if msg[0] == "add":
                    core.add_request(msg[1], msg[2], msg[3])
                elif msg[0] == "abort":
                    core.abort_request(msg[1])
                else:
                    stopping = True
                ready = conn.poll(0)
        except (EOFError, OSError):       # the API process is gone: nobody to serve
            return
        if stopping:
            outputs = core.abort_all()
        else:
            outputs = core.step() if core.has_unfinished_requests() else []
        running = core.num_running
        try:
            if outputs or running != last_running:
                items = [(rid, o.token_ids, o.logprobs, o.finish_reason, o.prompt_logprobs, o.error)
                         for rid, o in outputs]
                conn.send(("out", items, running))
                last_running = running
            if stopping:
                conn.send(("stopped",))
                return
        except (OSError, ValueError):
            return


if __name__ == "__main__":
    _engine_main(int(sys.argv[1]))
