"""The drained UDP reader (``DrainedUdpFront``) with real sockets on loopback, under
both event loops: bursts, ICMP errors, admission rules, close."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.zone
import pytest

from doqproxy.cache.policy import AnswerCache, CacheSettings
from doqproxy.frontend.access import AccessList
from doqproxy.frontend.admission import AccessSettings, Admission
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.udp_drain import DrainedUdpFront, choose_reader
from doqproxy.resolver import Resolver
from doqproxy.upstream.zone import ZoneBackend

NAMES = 150
ZONE = "\n".join(
    [
        "$ORIGIN drain.test.",
        "$TTL 3600",
        "@ SOA ns hostmaster 1 3600 600 86400 60",
        "@ NS ns",
        "ns A 127.0.0.1",
        *(f"n{i} A 192.0.2.{i % 250 + 1}" for i in range(NAMES)),
        "big TXT " + " ".join(f'"{c * 200}"' for c in "abcd"),  # an 850-octet reply
    ]
)
LOOPS = ["asyncio", "uvloop"]
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # Linux; Python 3.11 lacks the name


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


def make_front(
    *, ratelimit: float = 0.0, slip: int = 0, **options: Any
) -> tuple[DrainedUdpFront, int]:
    settings = AccessSettings(ratelimit=ratelimit, ratelimit_slip=slip)
    access = AccessList((ipaddress.ip_network("127.0.0.0/8"),))
    admission = Admission(settings, access, reaches_lan=False)
    zone = dns.zone.from_text(ZONE, origin="drain.test.")
    resolver = Resolver(ZoneBackend(zone), cache=AnswerCache(CacheSettings()))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", 0))
    return DrainedUdpFront(resolver, InFlight(), admission, sock, **options), sock.getsockname()[1]


def query(i: int, msg_id: int) -> bytes:
    message = dns.message.make_query(f"n{i}.drain.test.", "A")
    message.id = msg_id
    return message.to_wire()


def client(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def collect(sock: socket.socket, count: int, wait: float = 10.0) -> list[bytes]:
    """Up to ``count`` datagrams, waiting at most ``wait`` seconds in all."""
    got: list[bytes] = []
    deadline = time.monotonic() + wait
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return got


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_burst_is_read_in_few_callbacks_and_all_answered(loop_name: str) -> None:
    async def main() -> None:
        front, port = make_front()
        front.start()
        asker = client()
        try:
            # Misses first: they go to tasks and fill the cache.
            for i in range(NAMES):
                asker.sendto(query(i, i), ("127.0.0.1", port))
            first = await collect(asker, NAMES)
            assert len(first) == NAMES
            reads = front.reads
            # Then all hits, sent before the loop can run: they wait in the socket
            # together and are read a budget at a time.
            for i in range(NAMES):
                asker.sendto(query(i, 1000 + i), ("127.0.0.1", port))
            replies = [dns.message.from_wire(r) for r in await collect(asker, NAMES)]
            assert sorted(r.id for r in replies) == list(range(1000, 1000 + NAMES))
            for reply in replies:
                i = reply.id - 1000
                assert reply.rcode() == dns.rcode.NOERROR
                assert [rd.to_text() for rs in reply.answer for rd in rs] == [f"192.0.2.{i + 1}"]
            assert front.reads - reads <= NAMES // front.budget + 2
            assert front.dropped_replies == 0
        finally:
            asker.close()
            front.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_icmp_errors_do_not_stop_the_reader(loop_name: str) -> None:
    async def main() -> None:
        front, port = make_front()
        # IP_RECVERR makes Linux report ICMP errors on an unconnected socket; with
        # it, libuv stopped the reader at the first one (POLLERR). start() turns it off.
        front.sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        front.start()
        assert front.sock.getsockopt(socket.IPPROTO_IP, IP_RECVERR) == 0
        asker = client()
        try:
            for round_ in range(3):
                gone = client()
                gone.sendto(query(round_, 1), ("127.0.0.1", port))
                gone.close()  # the reply meets a closed port: ICMP port unreachable
                await asyncio.sleep(0.3)
                asker.sendto(query(round_, 2 + round_), ("127.0.0.1", port))
                replies = await collect(asker, 1)
                assert [dns.message.from_wire(r).id for r in replies] == [2 + round_]
            assert not front.closed
        finally:
            asker.close()
            front.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reflection_port_source_gets_nothing(loop_name: str) -> None:
    async def main() -> None:
        front, port = make_front()
        front.start()
        try:
            try:
                spoofed = client(19)  # chargen
            except OSError as exc:
                pytest.skip(f"cannot bind port 19 here: {exc}")
            try:
                spoofed.sendto(query(1, 7), ("127.0.0.1", port))
                assert await collect(spoofed, 1, wait=1.0) == []
            finally:
                spoofed.close()
            assert front.admission.stats.refused["reflection"] == 1
        finally:
            front.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_rate_limit_still_drops_and_slips(loop_name: str) -> None:
    async def main() -> None:
        front, port = make_front(ratelimit=1.0, slip=2)
        front.start()
        asker = client()
        try:
            for i in range(10):
                asker.sendto(query(i, i), ("127.0.0.1", port))
            replies = [dns.message.from_wire(r) for r in await collect(asker, 10, wait=3.0)]
            full = [r for r in replies if r.answer]
            slipped = [r for r in replies if not r.answer and r.flags & dns.flags.TC]
            assert 1 <= len(full) <= 2
            assert len(slipped) >= 3
            assert len(replies) < 10, "queries over the limit without a slip get nothing"
            stats = front.admission.stats
            assert stats.ratelimited["drop"] >= 3 and stats.ratelimited["slip"] >= 3
        finally:
            asker.close()
            front.close()

    run(loop_name, main)


def test_auto_drains_on_asyncio_only() -> None:
    assert choose_reader("auto", "asyncio") == "drain"
    assert choose_reader("auto", "uvloop") == "protocol"
    for loop_name in LOOPS:
        assert choose_reader("drain", loop_name) == "drain"
        assert choose_reader("protocol", loop_name) == "protocol"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_removes_the_reader(loop_name: str) -> None:
    async def main() -> None:
        front, port = make_front()
        front.start()
        fd = front.sock.fileno()
        front.close()
        front.close()  # twice is harmless
        assert front.closed and front.sock.fileno() == -1
        assert not asyncio.get_running_loop().remove_reader(fd)
        # Nothing listens any more: the port is free to bind again.
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        again.bind(("127.0.0.1", port))
        again.close()

    run(loop_name, main)
