"""Which new QUIC connections a DoQ server takes on, decided before any TLS work.

A server that takes every Initial is easy to lock up: each half-open handshake
holds state until it times out, and a flood of Initials that never complete (one
review sent about 1,100) used to fill ``max_connections`` for the whole idle
timeout. So a new connection is weighed against four counts, all kept here
without sockets:

- established connections, capped by ``max_connections``;
- handshakes not yet completed, capped by ``max_handshakes`` and ended by the
  listener after ``handshake_timeout``; they never count against
  ``max_connections``;
- connections per client address and per client prefix (/24, /56 by default),
  capped by ``max_per_address`` and ``max_per_prefix``.

Once ``retry_threshold`` handshakes are half open, clients whose address is not
validated yet get a stateless Retry (RFC 9000 §8.1.2) instead of state: a
spoofed flood then costs one small packet each, and real clients one round trip.

The verdicts are ACCEPT, RETRY and REFUSE; the listener answers REFUSE with a
bare CONNECTION_CLOSE (CONNECTION_REFUSED) in an Initial packet, before any TLS.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPT = "accept"
    RETRY = "retry"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Caps on new QUIC connections; see the module docstring."""

    max_connections: int = 1000
    max_handshakes: int = 256
    retry_threshold: int | None = 32
    """Half-open handshakes beyond which unvalidated clients get a Retry; ``None``
    never, 0 always (``--retry``)."""
    max_per_address: int = 64
    max_per_prefix: int = 256
    prefix_v4: int = 24
    prefix_v6: int = 56


def client_prefix(host: str, prefix_v4: int, prefix_v6: int) -> str:
    """The network a client address counts in (IPv4-mapped IPv6 counts as IPv4)."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = prefix_v4 if address.version == 4 else prefix_v6
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


class Admission:
    """The counts behind :meth:`decide`; the listener reports each connection's life."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.established = 0
        self.half_open = 0
        self._per_address: Counter[str] = Counter()
        self._per_prefix: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        """Refusals by reason, for logs and metrics."""
        self.retries = 0

    def _prefix(self, host: str) -> str:
        try:
            return client_prefix(host, self.limits.prefix_v4, self.limits.prefix_v6)
        except ValueError:
            return host

    def decide(self, host: str, *, validated: bool) -> tuple[Verdict, str]:
        """What to do with a new connection's first Initial from ``host``, and why."""
        limits = self.limits
        reason = ""
        if self.established >= limits.max_connections:
            reason = "too many connections"
        elif self._per_address[host] >= limits.max_per_address:
            reason = "too many connections from this address"
        elif self._per_prefix[self._prefix(host)] >= limits.max_per_prefix:
            reason = "too many connections from this network"
        elif (
            not validated
            and limits.retry_threshold is not None
            and self.half_open >= limits.retry_threshold
        ):
            self.retries += 1
            return Verdict.RETRY, "address not validated"
        elif self.half_open >= limits.max_handshakes:
            reason = "too many handshakes"
        if reason:
            self.refused[reason] += 1
            return Verdict.REFUSE, reason
        return Verdict.ACCEPT, ""

    def opened(self, host: str) -> None:
        """A connection from ``host`` was accepted; its handshake is under way."""
        self.half_open += 1
        self._per_address[host] += 1
        self._per_prefix[self._prefix(host)] += 1

    def handshake_done(self) -> None:
        """A half-open connection completed its handshake."""
        self.half_open -= 1
        self.established += 1

    def closed(self, host: str, *, established: bool) -> None:
        """A connection from ``host`` ended (or its handshake timed out)."""
        if established:
            self.established -= 1
        else:
            self.half_open -= 1
        _decrement(self._per_address, host)
        _decrement(self._per_prefix, self._prefix(host))

    def count(self, host: str) -> tuple[int, int]:
        """Connections from ``host`` and from its prefix."""
        return self._per_address[host], self._per_prefix[self._prefix(host)]


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
