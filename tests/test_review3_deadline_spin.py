"""Review finding: on uvloop, whose clock and timers count whole milliseconds, the
deadline timer can fire up to a millisecond before a deadline that is not a whole
number of milliseconds away (``--timeout 1.2345``). The sweep then found nothing due
and re-armed the timer for the same instant, again and again: the event loop spun
until the clock ticked, once per deadline. A sweep that fires must not come up empty."""

from __future__ import annotations

import asyncio
import random

import pytest

from doqproxy.deadlines import Deadlines

EXPIRIES = 100


async def empty_sweeps() -> int:
    book = Deadlines()
    sweep = book._sweep
    empty = 0

    def counted() -> None:
        nonlocal empty
        before = len(book)
        sweep()
        if len(book) == before:
            empty += 1

    book._sweep = counted  # type: ignore[method-assign]
    rng = random.Random(7)

    async def overdue(seconds: float) -> None:
        deadline = book.start(seconds)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
        finally:
            deadline.done()

    await asyncio.gather(*(overdue(0.01 + rng.random() * 0.2) for _ in range(EXPIRIES)))
    book.close()
    return empty


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_deadline_timer_never_fires_for_nothing(loop_name: str) -> None:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        empty = uvloop.run(empty_sweeps())
    else:
        empty = asyncio.run(empty_sweeps())
    assert empty <= EXPIRIES // 10, (
        f"{empty} timer callbacks for {EXPIRIES} deadlines found none due"
    )
