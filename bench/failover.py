"""Several upstreams, one going silent: a paced run of misses through three relays.

doqproxy forward (cache off, ``--upstream-strategy fastest``) has three upstreams:
the same ``doqproxy serve`` behind three relays adding different RTTs. A paced
UDP client sends misses at a fixed rate; a third of the way in, the fastest
relay black-holes everything (SIGUSR1), two thirds in it passes traffic again
(SIGUSR2). Per phase: p50/p99 latency, SERVFAILs, queries without an answer;
and how long after the black-hole the last query was slowed by it (answered
only after the hedge delay).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .procs import LOOPBACK

RCODE_SERVFAIL = 2


@dataclass(slots=True)
class Sample:
    sent: float
    """Seconds since the run started."""
    latency: float | None
    """Seconds until the answer; ``None`` when none came within the timeout."""
    rcode: int | None


def _query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, tuple[float, Sample]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4:
            return
        entry = self.waiting.pop(struct.unpack("!H", data[:2])[0], None)
        if entry is not None:
            started, sample = entry
            sample.latency = time.perf_counter() - started
            sample.rcode = data[3] & 0x0F


async def paced(
    port: int,
    names: list[str],
    qps: int,
    seconds: float,
    events: list[tuple[float, Callable[[], None]]],
    linger: float = 5.0,
) -> list[Sample]:
    """Send ``qps`` queries a second for ``seconds``; ``events`` run at their times;
    answers are awaited ``linger`` seconds after the last query."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, remote_addr=(LOOPBACK, port))
    samples: list[Sample] = []
    pending = sorted(events, key=lambda e: e[0])
    ids = random.sample(range(65536), 65536)
    start = time.perf_counter()
    total = int(qps * seconds)
    try:
        for index in range(total):
            due = start + index / qps
            while pending and pending[0][0] <= due - start:
                pending.pop(0)[1]()
            delay = due - time.perf_counter()
            if delay > 0.001:
                await asyncio.sleep(delay)
            qid = ids[index % 65536]
            sample = Sample(time.perf_counter() - start, None, None)
            client.waiting[qid] = (time.perf_counter(), sample)
            transport.sendto(_query(names[index % len(names)], qid))
            samples.append(sample)
        for _, action in pending:
            action()
        await asyncio.sleep(linger)
    finally:
        transport.close()
    return samples


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def summarize(
    samples: list[Sample], blackhole_at: float, restore_at: float, hedge_floor: float
) -> dict[str, Any]:
    """Per phase (before, during, after the black-hole) and the time traffic took to move."""
    phases = {
        "before": [s for s in samples if s.sent < blackhole_at],
        "during": [s for s in samples if blackhole_at <= s.sent < restore_at],
        "after": [s for s in samples if s.sent >= restore_at],
    }
    found: dict[str, Any] = {}
    for name, group in phases.items():
        answered = [s.latency * 1000 for s in group if s.latency is not None]
        p50, p99 = _pct(answered, 50), _pct(answered, 99)
        found[name] = {
            "queries": len(group),
            "unanswered": sum(s.latency is None for s in group),
            "servfail": sum(s.rcode == RCODE_SERVFAIL for s in group),
            "p50_ms": None if p50 is None else round(p50, 2),
            "p99_ms": None if p99 is None else round(p99, 2),
            "max_ms": round(max(answered), 2) if answered else None,
        }
    during = phases["during"]
    slowed = [s for s in during if s.latency is None or s.latency >= hedge_floor]
    found["slowed_by_the_blackhole"] = len(slowed)
    # The burst right after the black-hole: slowed queries less than 100 ms apart. Later
    # stragglers (a busy machine) are counted in slowed_by_the_blackhole, not here.
    moved = blackhole_at
    for sample in sorted(slowed, key=lambda s: s.sent):
        if sample.sent - moved > 0.1:
            break
        moved = sample.sent
    found["moved_after_ms"] = round((moved - blackhole_at) * 1000, 1)
    found["servfail_total"] = sum(found[p]["servfail"] for p in phases)
    found["median_before_ms"] = (
        round(statistics.median([s.latency * 1000 for s in phases["before"] if s.latency]), 2)
        if any(s.latency for s in phases["before"])
        else None
    )
    return found
