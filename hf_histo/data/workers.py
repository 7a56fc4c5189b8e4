"""How many processes read data (the CPUs this process may use, default worker counts) and an ordered process map."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
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
    """Processes building a patch dataset: every available CPU (the main process only waits), at most `limit`."""
    return max(1, min(available_cpus(), limit))


def process_pool(num_proc: int | None) -> ProcessPoolExecutor | None:
    """A pool of `num_proc` worker processes (forked where the OS can, else spawned); None for 0 or 1 process."""
    if not num_proc or num_proc < 2:
        return None
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ProcessPoolExecutor(max_workers=num_proc, mp_context=context)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], pool: Executor | None = None) -> Iterator[Any]:
    """`map(fn, items)` computed in `pool` (this process when None), yielded in the order of `items`.

    At most 4 items per worker are in flight, so a slow consumer does not pile results up in memory; `fn` and
    the items must pickle. Stopping early cancels the items not started yet.
    """
    if pool is None:
        yield from map(fn, items)
        return
    ahead = 4 * getattr(pool, "_max_workers", 1)
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
