"""Health of one upstream, as pure state driven by outcomes and a clock.

Each upstream has a smoothed RTT (learned from answers and handshakes), failure
counts by reason, and a state:

- ``up``: chosen by the strategy as usual;
- ``backoff``: skipped until ``retry_at``; the skip time doubles with each
  failed probe (``backoff_base`` up to ``backoff_cap``);
- ``probing``: the backoff has run out and one real query is on its way to see
  whether the upstream is back. Its answer makes the upstream ``up`` again; its
  failure sends it back to ``backoff`` for twice as long.

A connection failure, timeout, TLS or protocol error puts an upstream into
backoff at once. SERVFAIL and REFUSED answers are counted, but only
:data:`SOFT_LIMIT` of them in a row with no good answer in between do so: a
SERVFAIL for one broken domain says little about the server.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from doqproxy.dns.ede import Ede


class Reason(enum.StrEnum):
    """Why an upstream failed a query (the ``reason`` label of the failure metric)."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    TLS = "tls"
    PROTOCOL = "protocol"
    SERVFAIL = "servfail"
    REFUSED = "refused"


class State(enum.StrEnum):
    """Where an upstream stands (the ``state`` label of the state metric)."""

    UP = "up"
    BACKOFF = "backoff"
    PROBING = "probing"


SOFT_REASONS = frozenset({Reason.SERVFAIL, Reason.REFUSED})
SOFT_LIMIT = 5
"""SERVFAIL/REFUSED answers in a row (no good answer between) that count as a failure."""


@dataclass(slots=True, frozen=True)
class HealthSettings:
    """Tuning of the health state machine."""

    backoff_base: float = 1.0
    """Seconds an upstream is skipped after its first failure."""
    backoff_cap: float = 10.0
    """The longest skip, however often the probes fail (a probe costs clients nothing,
    so it can be short: a recovered upstream is back within this long)."""
    alpha: float = 0.125
    """Weight of a new RTT sample above the smoothed RTT (RFC 6298's 1/8)."""
    alpha_down: float = 0.5
    """Weight of a sample below it: the estimate falls fast, so that a server that
    is fast again (after a stall pushed its SRTT up) gets its traffic back soon."""
    probe_timeout: float = 10.0
    """A probe not settled after this long no longer blocks the next one."""


def classify(message: str, ede: Ede) -> Reason:
    """The reason of an upstream error, from its text and EDE code.

    The upstreams' errors (:mod:`doqproxy.upstream.doq_connection`, the pool,
    plain DNS) say what happened in words; this keeps the mapping in one place.
    """
    text = message.lower()
    if "tls" in text or "certificate" in text or "alert" in text or "pin" in text:
        return Reason.TLS
    if ede == Ede.INVALID_DATA or "bad doq answer" in text or "reset the stream" in text:
        return Reason.PROTOCOL
    if "no reply" in text or "no handshake" in text or "no answer" in text or "timed out" in text:
        return Reason.TIMEOUT
    if "protocol" in text or "mismatch" in text:
        return Reason.PROTOCOL
    return Reason.CONNECT


@dataclass(slots=True)
class Health:
    """One upstream's health; every method takes ``now`` from one monotonic clock."""

    settings: HealthSettings = field(default_factory=HealthSettings)
    srtt: float | None = None
    """Smoothed RTT in seconds; ``None`` until the first sample."""
    state: State = State.UP
    retry_at: float = 0.0
    """While in backoff: when the next probe may go out."""
    backoffs: int = 0
    """Backoffs since the last good answer: the exponent of the skip time."""
    soft_streak: int = 0
    probe_started: float = 0.0
    last_sample: float = -math.inf
    """When the last RTT sample was taken (for exploration)."""
    last_heard: float = -math.inf
    """When the upstream last answered anything (SERVFAIL included)."""
    unmeasured: int = 0
    """Queries the group answered since the last RTT sample (for exploration)."""
    last_error: str = ""
    failures: dict[Reason, int] = field(default_factory=dict)

    # --- what happened --------------------------------------------------------

    def sample(self, rtt: float, now: float) -> None:
        """An RTT measurement (an answer or a handshake); no change of state."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt = rtt
        else:
            settings = self.settings
            alpha = settings.alpha if rtt >= self.srtt else settings.alpha_down
            self.srtt += alpha * (rtt - self.srtt)
        self.last_sample = now
        self.unmeasured = 0

    def slower_than(self, elapsed: float, now: float, *, silent: bool = False) -> None:
        """No answer after ``elapsed`` seconds (a hedge went out, or another upstream's
        answer won).

        Only a lower bound on the RTT, so it is used only when it raises the
        estimate: a stalled upstream's SRTT climbs with each such query until
        the strategy prefers another one. ``silent`` (nothing at all heard from
        the upstream since the query went out) weighs it like a fall: one such
        query is enough to move traffic away from a server that went dark.
        """
        if self.srtt is None or elapsed > self.srtt:
            if silent and self.srtt is not None:
                self.srtt += self.settings.alpha_down * (elapsed - self.srtt)
                self.last_sample = now
                self.unmeasured = 0
            else:
                self.sample(elapsed, now)

    def answered(self, rtt: float, now: float) -> None:
        """A usable answer (neither SERVFAIL nor REFUSED) after ``rtt`` seconds.

        The first answer after a backoff replaces the SRTT instead of smoothing
        into it: the old figure describes the outage, not the server.
        """
        if self.state is not State.UP:
            self.srtt = None
            self.state = State.UP
            self.last_error = ""
        self.sample(rtt, now)
        self.soft_streak = 0
        self.backoffs = 0

    def failed(self, reason: Reason, message: str, now: float) -> None:
        """A failed query; SERVFAIL/REFUSED are answers, so :meth:`sample` them too."""
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.last_error = f"{reason}: {message}" if message else str(reason)
        if reason in SOFT_REASONS:
            self.soft_streak += 1
            if self.soft_streak < SOFT_LIMIT and self.state is not State.PROBING:
                return
            self.soft_streak = 0
        self._back_off(now)

    def _back_off(self, now: float) -> None:
        settings = self.settings
        skip = min(settings.backoff_cap, settings.backoff_base * 2.0 ** min(self.backoffs, 30))
        self.state = State.BACKOFF
        self.retry_at = now + skip
        self.backoffs += 1

    # --- what to do -----------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.state is State.UP

    def probe_due(self, now: float) -> bool:
        """Whether one real query should go out now to see if the upstream is back."""
        if self.state is State.BACKOFF:
            return now >= self.retry_at
        if self.state is State.PROBING:
            return now - self.probe_started >= self.settings.probe_timeout
        return False

    def start_probe(self, now: float) -> None:
        self.state = State.PROBING
        self.probe_started = now

    def probe_abandoned(self, now: float) -> None:
        """The probe was cancelled before it could tell: probe again when next due."""
        if self.state is State.PROBING:
            self.state = State.BACKOFF
            self.retry_at = now

    def failure_count(self, reason: Reason) -> int:
        return self.failures.get(reason, 0)
