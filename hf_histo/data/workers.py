"""How many processes read data (the CPUs this process may use, default worker counts) and an ordered process map."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

MAX_WORKERS = 8  # beyond ~8 loader processes per GPU the gain is small and memory grows with each

__all__ = ["MAX_WORKERS", "available_cpus", "default_num_proc", "default_num_workers", "ordered_map", "process_pool"]


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (Linux, containers), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_workers(limit: int = MAX_WORKERS) -> int:
    """DataLoader workers per training process: its share of the CPUs minus one for the training loop, <= `limit`.

    Processes launched together on one machine (`LOCAL_WORLD_SIZE`, set by torchrun / `accelerate launch`) share
    its CPUs. 0 (load in the training process) on a single CPU.
    """
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(available_cpus() // processes - 1, limit))


def default_num_proc(limit: int = MAX_WORKERS) -> int:
    """Processes building a patch dataset: every available CPU (the main process is one of them), at most `limit`."""
    return max(1, min(available_cpus(), limit))


def process_pool(num_proc: int | None) -> ProcessPoolExecutor | None:
    """Worker processes for `num_proc` processes in all: `num_proc - 1` workers, the caller being the last.

    `ordered_map` gives the calling process its share of the items, so `num_proc` processes on `num_proc` CPUs
    leave none idle and none oversubscribed. Forked where the OS can, else spawned; None for 0 or 1 process.
    """
    if not num_proc or num_proc < 2:
        return None
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(max_workers=num_proc - 1, mp_context=context)


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    pool: Executor | None = None,
    discard: Callable[[Any], None] | None = None,
    here: Callable[[Any], Any] | None = None,
) -> Iterator[Any]:
    """`map(fn, items)` computed by `pool`'s workers and this process, yielded in the order of `items`.

    Whenever the next result is not ready, this process computes the newest queued item that no worker has
    started, instead of waiting; so it takes the share of the work its own writing leaves it time for. At most
    16 items per worker are queued (a deep queue leaves this process items to take while the pool's own call queue
    holds the oldest; 4 per worker left it waiting ~15% of a GlaS build), so a slow consumer does not pile results
    up without bound; `fn` and the items must pickle. Stopping early cancels the items not started yet, and passes the results computed but not yielded to
    `discard` (to free what they hold outside this process). `here` is what this process runs for an item it takes
    (`fn` by default): the same result, without what a worker does to send it.
    """
    if pool is None:
        yield from map(fn, items)
        return
    ahead = 16 * getattr(pool, "_max_workers", 1) + 1
    pending: deque[list[Any]] = deque()  # [future, item] in the order of `items`; [None, result] when done here
    try:
        for item in items:
            pending.append([pool.submit(fn, item), item])
            while len(pending) >= ahead:
                yield _next_result(here or fn, pending)
        while pending:
            yield _next_result(here or fn, pending)
    finally:
        for future, value in pending:
            if future is not None and not future.cancel() and discard is not None:
                try:
                    discard(future.result())
                except Exception:  # noqa: BLE001 - the item's own failure: nothing of it to free
                    pass
            elif future is None and discard is not None:
                discard(value)


def _next_result(fn: Callable[[Any], Any], pending: deque[list[Any]]) -> Any:
    """Pop the first result of `ordered_map`'s queue, computing unstarted later items here while it is not ready."""
    while True:
        future, value = pending[0]
        if future is None or future.done():
            pending.popleft()
            return value if future is None else future.result()
        for entry in reversed(pending):
            if entry[0] is not None and entry[0].cancel():  # no worker has started it: compute it here
                entry[:] = [None, fn(entry[1])]
                break
        else:  # every queued item is running or done: wait for the first
            pending.popleft()
            return future.result()
