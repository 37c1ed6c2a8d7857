"""Which upstreams a query goes to, in what order, and when to hedge: pure decisions.

:func:`plan` orders the upstreams for one query. Upstreams that are ``up`` come
first, in the strategy's order; those in backoff follow, soonest retry first,
so that a query still has somewhere to go when everything is failing. The
caller sends to the first ``plan.initial`` at once and to the next one each
time :func:`hedge_delay` passes without an answer, or at once when one fails.

:func:`side_trips` names upstreams that should see a copy of the query whose
answer nobody waits for: the half-open probe of an upstream whose backoff has
run out, and exploration of upstreams whose RTT was not measured lately. Both
cost the client nothing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from doqproxy.upstream.health import Health


class Strategy(enum.StrEnum):
    """``--upstream-strategy``."""

    FASTEST = "fastest"
    FAILOVER = "failover"
    PARALLEL = "parallel"
    ROUND_ROBIN = "round-robin"


@dataclass(slots=True, frozen=True)
class SelectionSettings:
    """How queries are spread over several upstreams."""

    strategy: Strategy = Strategy.FASTEST
    parallel: int = 2
    """Upstreams raced at once by ``parallel``."""
    hedge: bool = True
    hedge_factor: float = 3.0
    hedge_min: float = 0.05
    hedge_max: float = 0.5
    explore_interval: float = 1.0
    """Seconds after which an upstream's RTT is measured again with a side trip..."""
    explore_every: int = 50
    """...once this many queries went elsewhere meanwhile: at most 2% extra queries
    per upstream, and a quiet machine does not copy each query to every upstream."""


@dataclass(slots=True, frozen=True)
class Plan:
    """The order to try upstreams in (indices) and how many to start at once."""

    order: tuple[int, ...]
    initial: int


def plan(
    strategy: Strategy,
    healths: Sequence[Health],
    now: float,
    *,
    turn: int = 0,
    parallel: int = 2,
) -> Plan:
    """The order for one query; ``turn`` counts queries, for round-robin."""
    count = len(healths)
    up = [i for i in range(count) if healths[i].up]
    down = sorted(
        (i for i in range(count) if not healths[i].up),
        key=lambda i: (healths[i].retry_at, i),
    )
    if strategy is Strategy.FASTEST or strategy is Strategy.PARALLEL:
        # Never measured: after the measured ones (in the order given); a side trip
        # measures it without a client waiting on an upstream that may be slow or dead.
        up.sort(key=lambda i: (healths[i].srtt is None, healths[i].srtt or 0.0, i))
    elif strategy is Strategy.ROUND_ROBIN and up:
        shift = turn % len(up)
        up = up[shift:] + up[:shift]
    order = tuple(up + down)
    initial = min(max(1, parallel), count) if strategy is Strategy.PARALLEL else 1
    return Plan(order, max(1, min(initial, count)))


def hedge_delay(health: Health, settings: SelectionSettings) -> float:
    """How long to wait for this upstream before also asking the next one.

    ``hedge_factor`` times the SRTT clamped to [``hedge_min``, ``hedge_max``]; an
    upstream without an SRTT yet gets ``hedge_max``. ``inf`` with hedging off.
    """
    if not settings.hedge:
        return math.inf
    if health.srtt is None:
        return settings.hedge_max
    return min(settings.hedge_max, max(settings.hedge_min, settings.hedge_factor * health.srtt))


@dataclass(slots=True)
class HedgeBudget:
    """Caps early hedges at ``ratio`` of all queries, plus a burst of ``burst``.

    When every answer is late because the machine or the network is overloaded,
    hedging each query after 3 x SRTT would double the load and make things
    worse; the burst still covers an upstream that stalls all at once (every
    query in flight to it needs a hedge) until its SRTT has moved traffic away.
    A query refused an early hedge still gets one at ``hedge_max`` if its
    upstream has answered nothing since the query went out (it has stalled, so
    it must not cost the whole timeout); if it is answering other queries, just
    late, the machine is overloaded and the query waits instead.
    """

    ratio: float = 0.1
    burst: float = 100.0
    tokens: float = 100.0

    def earn(self) -> None:
        """One query: a little more room for hedges."""
        self.tokens = min(self.burst, self.tokens + self.ratio)

    def spend(self) -> bool:
        """Whether a hedge may go out now (and take its share)."""
        if self.tokens < 1.0 - 1e-9:  # ten tenths may add up to 0.999…
            return False
        self.tokens -= 1.0
        return True


def side_trips(
    healths: Sequence[Health],
    now: float,
    *,
    busy: frozenset[int] | set[int],
    chosen: Sequence[int],
    settings: SelectionSettings,
) -> tuple[list[int], list[int]]:
    """(probes, explorations) for this query: indices not in ``chosen`` nor ``busy``.

    A probe goes to each upstream whose backoff has run out; an exploration to
    each ``up`` upstream never measured, or not measured for ``explore_interval``
    seconds and ``explore_every`` queries. Only
    ``fastest`` and ``parallel`` explore: the other strategies do not use RTTs.
    """
    probes: list[int] = []
    explore: list[int] = []
    exploring = settings.strategy in (Strategy.FASTEST, Strategy.PARALLEL)
    for index, health in enumerate(healths):
        if index in busy or index in chosen:
            continue
        if health.probe_due(now):
            probes.append(index)
        elif exploring and health.up and _stale(health, now, settings):
            explore.append(index)
    return probes, explore


def _stale(health: Health, now: float, settings: SelectionSettings) -> bool:
    if health.srtt is None:
        return True
    return (
        now - health.last_sample >= settings.explore_interval
        and health.unmeasured >= settings.explore_every
    )
