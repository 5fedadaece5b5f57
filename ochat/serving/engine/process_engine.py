"""The transformers engine in its own process (the vLLM V1 layout): the HTTP process only parses, templates,
detokenizes and streams; the engine process only steps the batch.

Why: in one process the HTTP event loop and the engine thread share one GIL, and on a small CPU machine
the engine's many short torch calls each wait for the HTTP side to let the GIL go (measured on the 2-core VM:
the engine alone decodes 32 rows at ~2,700 tokens/s, behind the HTTP layer in the same process at ~750).

Protocol over one socket pair (multiprocessing.connection, pickled tuples), every message small:
  API -> engine: ("add", request_id, prompt_ids, SamplingParams) | ("abort", request_id) | ("shutdown",)
  engine -> API: ("ready", {"max_model_len": n}) | ("error", message) once at start, then one
                 ("out", [(request_id, token_ids, logprobs, finish_reason), ...], running, left_waiting) per
                 step (not one per token), and ("stopped",) last.
The engine process ignores SIGINT/SIGTERM (the API process shuts it down after its graceful wait) and exits
when the socket closes, so a killed API process leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator

from ochat.errors import OchatError
from ochat.serving.engine import EngineDeadError, EngineOutput, QueueFullError, SamplingParams, next_output


class EngineProcess:
    """A started engine process that has not been told its model yet: it imports torch and transformers
    (most of its start-up time) while the caller loads the tokenizer."""

    def __init__(self):
        ours, theirs = socket.socketpair()
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
    """Same interface as `TransformersEngine`; the model lives in a child process."""

    def __init__(self, model_dir: str, process: EngineProcess | None = None, start_timeout_s: float = 600.0,
                 **engine_options: Any):
        self.max_queue = engine_options.get("max_queue", 1024)
        process = process or EngineProcess()
        self._proc, self._conn = process.proc, process.conn
        self._send_lock = threading.Lock()
        self._stopped = False
        self._send((model_dir, engine_options))
        deadline = time.monotonic() + start_timeout_s
        while not self._conn.poll(0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise OchatError(f"the engine process for {model_dir} did not start (exit status {self._proc.returncode})")
        try:
            kind, info = self._conn.recv()
        except EOFError:
            kind, info = "error", "the engine process exited"
        if kind != "ready":
            self._kill()
            raise OchatError(f"the engine process for {model_dir} failed to start: {info}")
        self.max_model_len: int = info["max_model_len"]
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._submitted = 0          # adds sent
        self._left_waiting = 0       # of those, admitted to the batch or aborted while waiting (engine's count)
        self._running = 0
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="ochat-engine-reader", daemon=True)
        self._reader.start()

    # -- the Engine interface (event-loop side) ---------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"running": self._running, "waiting": max(0, self._submitted - self._left_waiting)}

    def can_accept(self, n: int) -> bool:
        return not (self._stopped or self._dead) and self.stats()["waiting"] + n <= self.max_queue

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[EngineOutput]:
        if self._stopped or self._dead:
            raise EngineDeadError("the engine is shutting down" if self._stopped else "the engine process died")
        waiting = self.stats()["waiting"]
        if waiting >= self.max_queue:
            raise QueueFullError(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._submitted += 1
        self._send(("add", request_id, list(prompt_ids), params))
        finished = False
        try:
            while True:
                out = await next_output(outputs)
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self) -> None:
        """Abort what still runs, stop the engine process (killed if it does not exit within 10 s)."""
        if self._stopped:
            return
        self._stopped = True
        self._send(("shutdown",))
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
        self._reader.join(timeout=5)
        self._conn.close()

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, ValueError):      # the engine process is gone; the reader fails its requests
                pass

    def _read(self) -> None:
        """Engine messages -> the requests' queues, one event-loop wake-up per step and loop."""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "stopped":
                    break
                _, items, self._running, self._left_waiting = msg
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for request_id, token_ids, logprobs, finish in items:
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        by_loop.setdefault(stream[0], []).append((stream[1], EngineOutput(token_ids, logprobs, finish)))
                for loop, batch in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_deliver, batch)
                    except RuntimeError:        # that event loop is gone
                        pass
        except (EOFError, OSError):
            pass
        finally:
            self._dead = True
            self._running = 0
            for request_id, (loop, queue) in list(self._streams.items()):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, EngineOutput([], finish_reason="abort"))
                except RuntimeError:
                    pass

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()


def _deliver(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


# -- the engine process ---------------------------------------------------------------------------------
def _engine_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the API process decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        from ochat.serving.engine.transformers_engine import TransformersEngine
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        model_dir, options = conn.recv()
    except EOFError:
        return
    try:
        class EngineCore(TransformersEngine):
            """The step loop without its thread; each step's outputs leave as one message."""

            def _flush(self) -> None:
                running = len(self._running) + len(self._prefilling)
                if not self._outbox and (running, self.left_waiting) == self.last_sent:
                    return
                items = [(seq.request_id, out.token_ids, out.logprobs, out.finish_reason) for seq, out in self._outbox]
                self._outbox = []
                self.last_sent = (running, self.left_waiting)
                conn.send(("out", items, running, self.left_waiting))

            def _count_admitted(self, n: int) -> None:
                self.left_waiting += n

        core = EngineCore(model_dir, start_thread=False, **options)
        core.left_waiting, core.last_sent = 0, (0, 0)
    except Exception as e:  # reported to the API process, which raises it as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"max_model_len": core.max_model_len}))
    _run(core, conn)


def _run(core, conn: Connection) -> None:
    import torch

    torch.set_grad_enabled(False)
    stopping = False
    while not stopping:
        busy = bool(core._waiting or core._prefilling or core._running)
        try:
            ready = conn.poll(0 if busy else None)
            while ready:
                msg = conn.recv()
                if msg[0] == "add":
                    core._inbox.put(("add", core._new_seq(msg[1], msg[2], msg[3], None, None)))
                elif msg[0] == "abort":
                    core._inbox.put(("abort", msg[1]))
                else:
                    stopping = True
                ready = conn.poll(0)
        except (EOFError, OSError):       # the API process is gone: nobody to serve
            return
        core._drain_inbox()
        if not stopping and (core._waiting or core._prefilling or core._running):
            core._safe_step()
        if stopping:
            core._abort_all()
        try:
            core._flush()
        except (OSError, ValueError):
            return
    try:
        conn.send(("stopped",))
    except OSError:
        pass


if __name__ == "__main__":
    _engine_main(int(sys.argv[1]))
