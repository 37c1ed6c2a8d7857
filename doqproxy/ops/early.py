"""A SIGHUP that arrives before ``forward`` is up is kept, not fatal (a SIGUSR1 is
ignored).

SIGHUP's default action ends a process, and a forwarder is sent one whenever the
network changes (a DHCP lease, a new VLAN), possibly while it is still starting.
:func:`hold_sighup` records such signals from the command's first step, before the
heavy imports; :meth:`~doqproxy.ops.control.Operations.start` applies them as one
reload once the reload handler is in place. Only the standard library is imported
here, so that the window before the handler is the interpreter's own start-up.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType

received: list[int] = []
"""SIGHUPs recorded since :func:`hold_sighup` (cleared when applied)."""

owned = False
"""Whether a running forwarder handles SIGHUP itself (then holding is a no-op: a
reload parses the command line again, which must not take the signal back)."""


def _record(signum: int, frame: FrameType | None) -> None:
    received.append(signum)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1 asks for the stats, which do not exist yet: not a reason to die."""


def hold_sighup() -> None:
    """Record SIGHUP from now on, and ignore SIGUSR1 until the loop takes it (its
    default action ends the process too); a new hold forgets what an earlier run
    recorded (several in-process runs), but not what this one already has."""
    if owned or threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers, and signals go there only
    if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, _ignore)
    if signal.getsignal(signal.SIGHUP) is not _record:
        received.clear()
        signal.signal(signal.SIGHUP, _record)


def is_forward(argv: Sequence[str]) -> bool:
    """Whether the command line runs ``doqproxy forward`` (its first word that is
    not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word == "forward"
    return False
