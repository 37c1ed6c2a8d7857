"""Process plumbing shared by the sub-commands: event loop, logging, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("doqproxy")


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if verbose < 3:
        # aioquic logs every packet at DEBUG; only -vvv wants that.
        logging.getLogger("quic").setLevel(max(level, logging.INFO))


T = TypeVar("T")

EVENT_LOOP_ENV = "DOQPROXY_EVENT_LOOP"
"""``uvloop`` or ``asyncio`` forces an event loop; unset or ``auto`` takes uvloop when
it is installed."""


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` on uvloop when it is installed, else on the default loop
    (``DOQPROXY_EVENT_LOOP=asyncio`` or ``=uvloop`` forces one)."""
    choice = os.environ.get(EVENT_LOOP_ENV, "auto").strip().lower() or "auto"

    async def logged() -> T:
        log.info("event loop: %s", event_loop_name())
        return await main()

    if choice not in ("auto", "uvloop", "asyncio"):
        raise SystemExit(f"Error: {EVENT_LOOP_ENV}={choice!r}: must be auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit(
                    f"Error: {EVENT_LOOP_ENV}=uvloop, but uvloop is not installed"
                ) from None
        else:
            result: T = uvloop.run(logged())
            return result
    return asyncio.run(logged())


def event_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running event loop's implementation."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event
