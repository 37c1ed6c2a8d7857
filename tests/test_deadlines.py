"""Deadlines on one timer behave like asyncio.timeout: overdue work is cancelled and
reported as expired, work that ends in time is left alone, and a cancellation
from someone else is never mistaken for (or swallowed as) a timeout."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from doqproxy import deadlines
from doqproxy.deadlines import Deadlines


async def guarded(book: Deadlines, seconds: float, work: float) -> str:
    deadline = book.start(seconds)
    try:
        try:
            await asyncio.sleep(work)
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
            return "timeout"
        finally:
            deadline.done()
        return "done"
    finally:
        assert deadline.task is None


def test_overdue_work_times_out_and_the_rest_finishes() -> None:
    async def main() -> list[str]:
        book = Deadlines()
        results = await asyncio.gather(
            guarded(book, 0.05, 5.0),
            guarded(book, 5.0, 0.01),
            guarded(book, 0.1, 5.0),
            guarded(book, 5.0, 0.2),
        )
        assert book.live == 0
        book.close()
        return results

    assert asyncio.run(main()) == ["timeout", "done", "timeout", "done"]


def test_an_earlier_deadline_rearms_the_timer() -> None:
    async def main() -> tuple[str, str, float]:
        book = Deadlines()
        loop = asyncio.get_running_loop()
        slow = loop.create_task(guarded(book, 30.0, 60.0))
        await asyncio.sleep(0)
        started = loop.time()
        fast = await guarded(book, 0.05, 60.0)
        elapsed = loop.time() - started
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        book.close()
        return fast, "cancelled", elapsed

    fast, _, elapsed = asyncio.run(main())
    assert fast == "timeout"
    assert elapsed < 20  # the 30 s deadline's timer did not hold the 0.05 s one back


def test_a_cancellation_from_outside_is_not_a_timeout() -> None:
    async def main() -> None:
        book = Deadlines()
        task = asyncio.get_running_loop().create_task(guarded(book, 5.0, 60.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert book.live == 0
        book.close()

    asyncio.run(main())


def test_outside_cancellation_racing_the_deadline_still_propagates() -> None:
    async def main() -> None:
        book = Deadlines()
        loop = asyncio.get_running_loop()
        task = loop.create_task(guarded(book, 0.05, 60.0))
        await asyncio.sleep(0.01)
        # Cancel from outside in the same loop turn as the deadline fires.
        loop.call_at(book._heap[0][0], task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        book.close()

    asyncio.run(main())


def test_a_deadline_that_fired_as_the_work_ended_takes_its_cancel_back() -> None:
    async def main() -> None:
        book = Deadlines()
        deadline = book.start(0.0)
        task = asyncio.current_task()
        assert task is not None
        book._sweep()  # due at once: this very task is asked to cancel...
        assert deadline.fired and task.cancelling() == 1
        deadline.done()  # ...but the work ended first: the request is withdrawn
        assert task.cancelling() == 0
        assert book.live == 0
        book.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # Python 3.11 still delivers the pending cancel

    asyncio.run(main())


def test_spent_entries_are_compacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadlines, "COMPACT_AT", 50)

    async def main() -> None:
        book = Deadlines()
        for _ in range(500):
            book.start(60.0).done()
        assert book.live == 0
        assert len(book) <= 51
        held = book.start(60.0)
        assert book.live == 1
        held.done()
        book.close()
        assert len(book) == 0

    asyncio.run(main())
