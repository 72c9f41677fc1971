"""Bounded prefetch on a process pool: results in submission order, a few tasks ahead, never the whole list in
flight (memory holds a few tasks' results, not the data set). Torch-free: preprocess and predict both use it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any


def prefetched(pool: Executor, function: Callable[..., Any], tasks: Iterable[tuple], *, ahead: int) -> Iterator[Any]:
    """``function(*task)`` for each task, run on ``pool`` and yielded in order, with at most ``ahead`` tasks
    submitted and not yet yielded. A task's exception (or the pool's, such as BrokenProcessPool) is raised
    where its result would have been yielded; tasks still queued are the pool owner's to cancel."""
    pending: deque = deque()  # futures, oldest first
    for task in tasks:
        pending.append(pool.submit(function, *task))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
