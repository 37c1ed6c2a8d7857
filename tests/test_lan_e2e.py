"""LAN safety on a real ``doqproxy forward`` process, on loopback.

Different clients and prefixes are different 127.0.0.0/8 source addresses
(127.0.1.x and 127.0.2.x are two /24s). Cases that need a client that is not
on loopback are in ``test_lan_netns.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from .conftest import ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .lan_helpers import (
    make_query,
    read_framed,
    sample,
    scrape,
    send_raw_udp,
    tcp_ask,
    udp_burst,
    wait_for_line,
)

StartProxy = Callable[..., ProxyProcess]

pytestmark = pytest.mark.slow


async def test_ratelimit_per_prefix_with_slip(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(
        upstream.port,
        "--ratelimit", "5", "--ratelimit-slip", "2",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        cache=True,
    )  # fmt: skip
    queries = [make_query("a.test.", msg_id=i) for i in range(40)]
    started = time.monotonic()
    replies = await asyncio.to_thread(udp_burst, proxy.port, queries, source="127.0.1.1")
    elapsed = time.monotonic() - started
    full = [r for r in replies if not r.flags & dns.flags.TC]
    slipped = [r for r in replies if r.flags & dns.flags.TC]
    # 5 tokens to start with, 5 a second after that.
    assert 1 <= len(full) <= 5 + 5 * elapsed + 1, (len(full), elapsed)
    assert all(r.answer for r in full)
    assert len(slipped) >= 10 and all(not r.answer for r in slipped)
    assert len(replies) < 40
    # Another /24 has its own bucket; the same /24 shares the exhausted one.
    other = await asyncio.to_thread(
        udp_burst, proxy.port, [make_query("a.test.", msg_id=99)], source="127.0.2.1"
    )
    assert len(other) == 1 and other[0].answer and not other[0].flags & dns.flags.TC
    metrics = await asyncio.to_thread(scrape, metrics_port)
    assert sample(metrics, "doqproxy_ratelimited_total", action="slip") == len(slipped)
    dropped = sample(metrics, "doqproxy_ratelimited_total", action="drop")
    assert dropped >= 10
    assert sample(metrics, "doqproxy_refused_total", reason="ratelimit") == len(slipped) + dropped


async def test_ratelimit_is_off_on_loopback_only_listeners(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "-v", cache=True)
    await asyncio.to_thread(wait_for_line, proxy.stderr, "UDP rate limit off")
    queries = [make_query("a.test.", msg_id=i) for i in range(160)]
    replies = await asyncio.to_thread(udp_burst, proxy.port, queries, source="127.0.1.1")
    assert len(replies) == 160
    assert not any(r.flags & dns.flags.TC for r in replies)


async def test_any_over_udp_gets_rfc8482_and_tcp_is_forwarded(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    (reply,) = await asyncio.to_thread(
        udp_burst, proxy.port, [make_query("a.test.", "ANY", msg_id=7, use_edns=0)]
    )
    assert reply.id == 7 and reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"
    assert upstream.seen_names() == []
    raw = await asyncio.to_thread(tcp_ask, proxy.port, make_query("a.test.", "ANY", msg_id=8))
    assert dns.message.from_wire(raw).id == 8
    assert upstream.seen_names() == ["a.test."]
    assert upstream.state.seen[0].message.question[0].rdtype == dns.rdatatype.ANY
    metrics = await asyncio.to_thread(scrape, metrics_port)
    assert sample(metrics, "doqproxy_any_minimal_total") == 1


async def test_no_refuse_any_forwards_udp(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--no-refuse-any")
    (reply,) = await asyncio.to_thread(
        udp_burst, proxy.port, [make_query("a.test.", "ANY", msg_id=7)]
    )
    assert not any(rrset.rdtype == dns.rdatatype.HINFO for rrset in reply.answer)
    assert upstream.seen_names() == ["a.test."]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding ports < 1024 and raw sockets need root")
async def test_reflection_ports_are_never_answered(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"127.0.0.1:{metrics_port}", cache=True)
    for port in (19, 7, 123, 11211):
        replies = await asyncio.to_thread(
            udp_burst, proxy.port, [make_query("a.test.")], source="127.0.1.9", source_port=port
        )
        assert replies == [], port
    # Source port 0 cannot be bound; it can be forged. No reply can come back to it,
    # so what shows that it was dropped is the counter and the silent upstream.
    await asyncio.to_thread(send_raw_udp, "127.0.1.9", 0, proxy.port, make_query("n1.test."))
    replies = await asyncio.to_thread(
        udp_burst, proxy.port, [make_query("a.test.")], source="127.0.1.9", source_port=40053
    )
    assert len(replies) == 1 and replies[0].answer
    metrics = await asyncio.to_thread(scrape, metrics_port)
    assert sample(metrics, "doqproxy_refused_total", reason="reflection") == 5
    assert upstream.seen_names() == ["a.test."]


async def test_error_replies_are_rate_limited(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--ratelimit", "1000", "--ratelimit-errors", "5")
    bad = []
    for i in range(60):
        data = bytearray(make_query("a.test.", msg_id=i))
        data[2] |= 2 << 3  # opcode STATUS: NOTIMP
        bad.append(bytes(data))
    started = time.monotonic()
    replies = await asyncio.to_thread(udp_burst, proxy.port, bad, source="127.0.1.1")
    elapsed = time.monotonic() - started
    assert all(r.rcode() == dns.rcode.NOTIMP for r in replies)
    assert 1 <= len(replies) <= 5 + 5 * elapsed + 1, (len(replies), elapsed)
    # Good queries from the same prefix are still answered.
    good = await asyncio.to_thread(
        udp_burst, proxy.port, [make_query("a.test.", msg_id=500)], source="127.0.1.1"
    )
    assert len(good) == 1 and good[0].answer


async def test_in_flight_cap_answers_servfail_at_once(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    upstream.state.slow_delay = 4.0
    metrics_port = free_port()
    proxy = start_proxy(
        upstream.port,
        "--max-in-flight", "4", "--timeout", "10",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    queries = [make_query("slow.test.", msg_id=i, use_edns=0) for i in range(10)]
    replies = await asyncio.to_thread(udp_burst, proxy.port, queries, quiet=8.0)
    assert len(replies) == 10
    rcodes = [r.rcode() for r in replies]
    # The six beyond the cap come back first, before the upstream has answered anything.
    assert rcodes[:6] == [dns.rcode.SERVFAIL] * 6 and rcodes[6:] == [dns.rcode.NOERROR] * 4
    ede = replies[0].options[0]
    assert isinstance(ede, dns.edns.EDEOption) and ede.code == dns.edns.EDECode.OTHER
    assert ede.text == "too many queries in flight"
    metrics = await asyncio.to_thread(scrape, metrics_port)
    assert sample(metrics, "doqproxy_refused_total", reason="inflight_cap") == 6


async def test_servfail_log_lines_are_aggregated(start_proxy: StartProxy, tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there: every query fails at once
    proxy = start_proxy(dead, "--timeout", "2")
    queries = [make_query("a.test.", msg_id=i) for i in range(200)]
    replies = await asyncio.to_thread(udp_burst, proxy.port, queries, quiet=4.0)
    assert len(replies) == 200 and all(r.rcode() == dns.rcode.SERVFAIL for r in replies)
    lines = [line for line in proxy.stderr().splitlines() if "SERVFAIL for a.test." in line]
    assert 1 <= len(lines) <= 5, lines  # one per 10 s; 200 without aggregation


async def test_query_log_is_not_world_readable(
    upstream: DoqTestUpstream, start_proxy: StartProxy, tmp_path: Path
) -> None:
    path = tmp_path / "queries.jsonl"
    old = os.umask(0o022)
    try:
        proxy = start_proxy(upstream.port, "--query-log", str(path))
    finally:
        os.umask(old)
    await asyncio.to_thread(udp_burst, proxy.port, [make_query("a.test.")])
    assert await asyncio.to_thread(_wait_for, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_metrics_on_a_wildcard_address_warn(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(upstream.port, "--metrics-listen", f"0.0.0.0:{metrics_port}")
    await asyncio.to_thread(scrape, metrics_port)
    log = await asyncio.to_thread(wait_for_line, proxy.stderr, "no authentication")
    assert "WARNING" in log


async def test_tcp_slots_per_prefix_and_eviction_of_idle(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(
        upstream.port,
        "--tcp-max-connections", "16", "--tcp-max-connections-per-ip", "4",
        "--tcp-max-connections-per-prefix", "8", "--tcp-idle-timeout", "60",
    )  # fmt: skip

    def scenario() -> None:
        held: list[socket.socket] = []
        try:
            # One /24 holds at most 8 slots, however many addresses it uses.
            for i in range(12):
                held.append(
                    socket.create_connection(("127.0.0.1", proxy.port), 10, (f"127.0.3.{i}", 0))
                )
            closed = _settle(held, 4)
            assert len(closed) == 4  # four beyond the prefix's share
            # Other prefixes fill the table (16 slots, 2 of them the reserve).
            for i in range(8):
                held.append(
                    socket.create_connection(("127.0.0.1", proxy.port), 10, (f"127.4.{i}.1", 0))
                )
            time.sleep(2.0)
            assert sum(_closed_by_peer(s) for s in held) == 4  # 16 open
            # Full: a newcomer is served, and the oldest idle connection makes room.
            reply = tcp_ask(proxy.port, make_query("a.test.", msg_id=5), source="127.9.9.9")
            assert dns.message.from_wire(reply).answer
            assert _closed_by_peer(held[0])
            assert not _closed_by_peer(held[1])
        finally:
            for sock in held:
                sock.close()

    await asyncio.to_thread(scenario)


async def test_tcp_maximum_connection_age(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--tcp-max-connection-age", "2", "--tcp-idle-timeout", "60")

    def scenario() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), 10) as sock:
            data = make_query("a.test.", msg_id=1)
            sock.sendall(struct.pack("!H", len(data)) + data)
            assert _read_until_closed(sock, 30)
        return time.monotonic() - started

    lifetime = await asyncio.to_thread(scenario)
    assert lifetime < 30  # well below the idle timeout of 60 s


def _settle(
    socks: list[socket.socket], expected: int, timeout: float = 15.0
) -> list[socket.socket]:
    """The sockets the server has closed, once ``expected`` of them are (or at the timeout)."""
    closed: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        closed += [s for s in socks if s not in closed and _closed_by_peer(s)]
        if len(closed) >= expected:
            break
        time.sleep(0.1)
    return closed


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65535) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _read_until_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65535):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def _wait_for(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


ANSWERS = 40


async def test_tcp_client_that_reads_late_gets_every_answer(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    """Answers queued while the client is behind (past the 64 KiB high-water mark)
    all arrive, in full, once it reads: 40 pipelined 16 KB answers, 640 KB (the
    client's 4 KiB window keeps the kernel's share small; reading them back takes
    about a second per ten answers here, so not more)."""
    proxy = start_proxy(upstream.port, cache=True)

    def scenario() -> list[int]:
        with socket.create_connection(("127.0.0.1", proxy.port), 10, ("127.0.5.1", 0)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for i in range(ANSWERS):
                data = make_query("big.test.", "TXT", msg_id=i)
                sock.sendall(struct.pack("!H", len(data)) + data)
            time.sleep(3.0)  # not reading: the answers pile up on the forwarder's side
            sock.settimeout(20)
            ids = []
            for _ in range(ANSWERS):
                reply = dns.message.from_wire(read_framed(sock))
                assert sum(len(rrset) for rrset in reply.answer) == 64
                ids.append(reply.id)
            return ids

    ids = await asyncio.to_thread(scenario)
    assert sorted(ids) == list(range(ANSWERS))


async def test_allow_any_warns_of_an_open_resolver(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--allow", "any")
    log = await asyncio.to_thread(wait_for_line, proxy.stderr, "open resolver")
    assert "WARNING" in log and "--allow any" in log
