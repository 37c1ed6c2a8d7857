"""Request coalescing: identical work in flight is done once and shared."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs at most one task per key; later callers with the same key join it.

    The shared task belongs to the coalescer, not to any caller: a caller that
    is cancelled (a client gone, a stale-answer timer fired) stops waiting but
    the task runs on, so its answer still reaches the cache and the other
    waiters. Callers wait with :meth:`wait`, which shields the task.
    """

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Task[T]] = {}
        self.started = 0
        """Tasks started."""
        self.joined = 0
        """Callers that joined a task already in flight."""

    def __len__(self) -> int:
        return len(self._inflight)

    def start(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        """The task for ``key``, started from ``work()`` if none is in flight."""
        task = self._inflight.get(key)
        if task is not None:
            self.joined += 1
            return task
        task = asyncio.get_running_loop().create_task(work())
        self._inflight[key] = task
        self.started += 1

        def forget(done: asyncio.Task[T]) -> None:
            if self._inflight.get(key) is done:
                del self._inflight[key]

        task.add_done_callback(forget)
        return task

    @staticmethod
    async def wait(task: asyncio.Task[T]) -> T:
        """Wait for ``task``; cancelling the waiter (e.g. by a timeout) leaves it running."""
        return await asyncio.shield(task)

    async def join(self) -> None:
        """Wait until nothing is in flight (including work started meanwhile)."""
        while self._inflight:
            await asyncio.wait(list(self._inflight.values()))

    async def aclose(self) -> None:
        """Cancel whatever is still in flight."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
