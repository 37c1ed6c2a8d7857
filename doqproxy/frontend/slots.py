"""Fair shares of the client TCP connection slots (pure bookkeeping).

Connections are counted per address and per prefix (/24, /56), so eight
addresses in one /24 or one IPv6 /64 cannot hold every slot. The last
``reserve`` slots are kept for prefixes that hold fewer than ``few``
connections, so a busy prefix cannot lock out a newcomer. When the slots a
client may use are all taken, the oldest idle connection is closed to make
room (:attr:`Admit.EVICT`); only when none is idle is the newcomer refused.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass


class Admit(enum.Enum):
    """The verdict for a new connection."""

    YES = "yes"
    EVICT = "evict"
    """Admit it once the oldest idle connection is closed; refuse if none is idle."""
    NO = "no"


@dataclass(slots=True, frozen=True)
class SlotLimits:
    max_connections: int = 256
    max_per_ip: int = 32
    max_per_prefix: int = 64
    reserve: int = 32
    """Slots only prefixes holding fewer than ``few`` connections may take."""
    few: int = 4


class SlotTable:
    """Counts of open connections by address and by prefix."""

    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: Counter[Hashable] = Counter()
        self.per_prefix: Counter[Hashable] = Counter()

    def admit(self, ip: Hashable, prefix: Hashable) -> Admit:
        """May a connection from ``ip`` in ``prefix`` take a slot?"""
        limits = self.limits
        if self.per_ip[ip] >= limits.max_per_ip or self.per_prefix[prefix] >= limits.max_per_prefix:
            return Admit.NO
        small = self.per_prefix[prefix] < limits.few
        ceiling = limits.max_connections if small else limits.max_connections - limits.reserve
        if self.total < ceiling:
            return Admit.YES
        # Closing one idle connection makes room only if that brings us under the
        # ceiling: a busy prefix may not evict its way into the reserve.
        return Admit.EVICT if self.total == ceiling or small else Admit.NO

    def add(self, ip: Hashable, prefix: Hashable) -> None:
        self.total += 1
        self.per_ip[ip] += 1
        self.per_prefix[prefix] += 1

    def remove(self, ip: Hashable, prefix: Hashable) -> None:
        self.total -= 1
        for counter, key in ((self.per_ip, ip), (self.per_prefix, prefix)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
