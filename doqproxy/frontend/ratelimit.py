"""Per-client-prefix token buckets, with BIND/Knot-style slip, in bounded memory.

Pure: the caller passes the time. Clients are grouped by prefix (/24 for
IPv4 and /56 for IPv6 by default), because a spoofing attacker or one
household behind NAT holds a prefix, not an address.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from doqproxy.frontend.access import IpAddress

MAX_BUCKETS = 16384
"""Buckets kept at most; the least recently used one goes first. About 2 MB."""


class Decision(enum.Enum):
    """What to do with one query from a client prefix."""

    PASS = "pass"
    DROP = "drop"
    SLIP = "slip"
    """Over the limit, but answer with an empty TC=1 reply so a real client
    (one that is not spoofed) retries over TCP."""


def prefix_key(address: IpAddress, prefix_v4: int, prefix_v6: int) -> tuple[int, int]:
    """(IP version, the address's prefix as an integer): the bucket a client uses."""
    if isinstance(address, ipaddress.IPv4Address):
        return 4, int(address) >> (32 - prefix_v4)
    return 6, int(address) >> (128 - prefix_v6)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    over: int = 0


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up.

    ``slip`` = N answers every Nth query over the limit with TC=1 (0: never,
    1: always), as BIND's and Knot's RRL do.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        slip: int = 0,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.slip = slip
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: tuple[int, int], now: float) -> Decision:
        """Spend one token for ``key``."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_buckets:
                buckets.popitem(last=False)
            bucket = buckets[key] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(key)
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
                bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Decision.PASS
        bucket.over += 1
        if self.slip and bucket.over % self.slip == 0:
            return Decision.SLIP
        return Decision.DROP
