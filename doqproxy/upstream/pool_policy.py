"""Pure decisions of the upstream connection pool: which connection takes a query,
and how long to wait before trying a dead upstream again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class PooledConnection(Protocol):
    """What the policy looks at on each connection."""

    @property
    def usable(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def last_heard(self) -> float: ...

    @property
    def stream_credit(self) -> int:
        """Streams the peer still allows us to open."""
        ...

    @property
    def idle_timeout(self) -> float:
        """The connection's negotiated idle timeout in seconds."""
        ...

    @property
    def opened_at(self) -> float:
        """When the connection was opened (same clock as ``now``)."""
        ...


def pick(
    connections: Sequence[PooledConnection],
    *,
    now: float,
    max_streams: int,
    idle_margin: float = 1.0,
    max_age: float | None = None,
) -> int | None:
    """Index of the live connection with the most spare capacity, or ``None``.

    Spare capacity is the smaller of ``max_streams`` minus the queries in flight
    and the peer's remaining stream credit. A connection that is full, dead, or
    within ``idle_margin`` seconds of its idle timeout (it may be gone by the
    time the query arrives) is skipped, and so is one older than ``max_age``
    (it is drained and closed).
    """
    best: int | None = None
    best_spare = 0
    for index, conn in enumerate(connections):
        if not conn.usable or now - conn.last_heard >= conn.idle_timeout - idle_margin:
            continue
        if max_age is not None and now - conn.opened_at >= max_age:
            continue
        spare = min(max_streams - conn.in_flight, conn.stream_credit)
        if spare > best_spare:
            best, best_spare = index, spare
    return best


@dataclass(slots=True)
class Backoff:
    """Exponential backoff between failed connection attempts."""

    base: float = 0.25
    cap: float = 5.0
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float) -> None:
        self.not_before = now + min(self.cap, self.base * (2**self.failures))
        self.failures += 1

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def wait(self, now: float) -> float:
        """Seconds until the next attempt is allowed (0 when it is)."""
        return max(0.0, self.not_before - now)
