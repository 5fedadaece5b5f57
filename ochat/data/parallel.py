"""One primitive for every data step: an ordered, batched, bounded-memory parallel map.

`parallel_map(fn, batches, workers)` yields `fn(batch)` for each batch, in input order, computed in
`workers` processes (in this one when workers <= 1). `fn` is sent to each worker once, when it
starts (the tokenizer inside it is not re-sent with every batch); at most 2 * workers + 2 batches
are in flight, so a long input is never read ahead into memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

_WORKER_FN: Callable[[list], Any] | None = None  # this worker process's `fn`


def _start_worker(fn: Callable[[list], Any]) -> None:
    global _WORKER_FN
    _WORKER_FN = fn


def _run_batch(batch: list) -> Any:
    return _WORKER_FN(batch)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def parallel_map(fn: Callable[[list], Any], batches: Iterable[list], workers: int) -> Iterator[Any]:
    if workers <= 1:
        for batch in batches:
            yield fn(batch)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per worker
    # a worker that dies (killed, out of memory) fails the run with BrokenProcessPool instead of hanging it
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(fn,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_run_batch, batch))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
