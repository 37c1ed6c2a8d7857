"""Query deadlines on one timer: what ``asyncio.timeout`` does, at a fraction of the cost.

``asyncio.timeout`` builds a context manager and schedules, reschedules and
cancels a timer handle for every query: about 12 µs of a cache miss's CPU here.
Every upstream query of a resolver has the same timeout, so the deadlines come in
nearly the order they are set. :class:`Deadlines` keeps them in a heap and runs a
single timer for the earliest one; a finished query just drops its task from its
entry, and the timer sweeps spent entries as it passes them.

The cancellation semantics are those of ``asyncio.timeout``: the overdue task is
cancelled, and :meth:`Deadline.expired` (true only for a cancellation this object
caused and nobody else asked for) lets the caller turn that ``CancelledError``
into its timeout path.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

COMPACT_AT = 1024
"""Heap entries past which spent ones are dropped (when they are most of them)."""
SLACK = 0.001
"""Seconds early a deadline may fire: uvloop's clock and timers count whole
milliseconds, so its timer can run that much before a deadline that is not a whole
number of milliseconds away; a sweep that then found nothing due would re-arm for
the same instant and spin until the clock ticked."""


class Deadline:
    """One task's deadline; :meth:`Deadlines.start` makes them."""

    __slots__ = ("_cancelling", "_owner", "fired", "task")

    def __init__(
        self, owner: Deadlines, task: asyncio.Task[object] | None, cancelling: int
    ) -> None:
        self._owner = owner
        self.task = task
        self.fired = False
        self._cancelling = cancelling

    def done(self) -> None:
        """The work finished (or failed) in time: nothing to cancel any more."""
        task = self.task
        if task is not None:
            self.task = None
            self._owner.live -= 1
            if self.fired:
                task.uncancel()  # fired as the work ended anyway: take it back

    def expired(self) -> bool:
        """Whether the ``CancelledError`` being handled came from this deadline alone.

        Call it once, in the ``except CancelledError`` of the guarded work: it also
        takes back the cancellation, as ``asyncio.timeout`` does on expiry.
        """
        task = self.task
        if task is None:
            return False
        self.task = None
        self._owner.live -= 1
        if not self.fired:
            return False
        return task.uncancel() <= self._cancelling


class Deadlines:
    """Cancels tasks that overrun their deadlines, with one timer for all of them."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.live = 0
        """Deadlines whose work is still running."""

    def __len__(self) -> int:
        return len(self._heap)

    def start(self, seconds: float) -> Deadline:
        """Cancel the current task if it is still running ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        when = loop.time() + seconds
        deadline = Deadline(self, task, task.cancelling() if task is not None else 0)
        heap = self._heap
        if len(heap) > COMPACT_AT and len(heap) > 4 * self.live:
            # Mostly entries of work that ended long before its deadline: drop them.
            heap[:] = [entry for entry in heap if entry[2].task is not None]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, next(self._order), deadline))
        self.live += 1
        if self._timer is None or when < self._timer_at:
            self._arm(loop, when)
        return deadline

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        due = loop.time() + SLACK
        heap = self._heap
        while heap and heap[0][0] <= due:
            _, _, deadline = heapq.heappop(heap)
            task = deadline.task
            if task is None:
                continue
            if task.done():  # ended without saying so (it cannot any more)
                deadline.task = None
                self.live -= 1
            else:
                deadline.fired = True
                task.cancel()
        if heap:
            self._arm(loop, heap[0][0])

    def close(self) -> None:
        """Stop the timer; deadlines not yet due never fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self.live = 0
