"""Unit tests for address parsing and the pool policy (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from doqproxy.net.addresses import AddressError, HostPort, UpstreamUrl, parse_listen, parse_upstream
from doqproxy.upstream import pool_policy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.53:53", HostPort("127.0.0.53", 53)),
        ("127.0.0.1", HostPort("127.0.0.1", 53)),
        ("[::1]:5353", HostPort("::1", 5353)),
        ("::1", HostPort("::1", 53)),
        ("[::1]", HostPort("::1", 53)),
    ],
)
def test_parse_listen(text: str, expected: HostPort) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["localhost:53", "1.2.3.4:99999", "[::1:53", "[::1]x", "1.2.3.4:x"]
)
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(AddressError):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quic://dns.example", UpstreamUrl("quic", "dns.example", 853)),
        ("quic://dns.example:8853", UpstreamUrl("quic", "dns.example", 8853)),
        ("quic://[2001:db8::1]", UpstreamUrl("quic", "2001:db8::1", 853)),
        ("quic://192.0.2.1:784/", UpstreamUrl("quic", "192.0.2.1", 784)),
    ],
)
def test_parse_upstream(text: str, expected: UpstreamUrl) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "dns.example",
        "tls://dns.example",
        "quic://",
        "quic://h:70000",
        "quic://h/path",
        "quic://u@h",
    ],
)
def test_parse_upstream_errors(text: str) -> None:
    with pytest.raises(AddressError):
        parse_upstream(text)


@dataclass
class Conn:
    usable: bool = True
    in_flight: int = 0
    last_heard: float = 100.0
    stream_credit: int = 1000
    idle_timeout: float = 30.0
    opened_at: float = 90.0


def test_pick_most_spare_capacity() -> None:
    conns = [Conn(in_flight=5), Conn(in_flight=1), Conn(in_flight=3)]
    assert pool_policy.pick(conns, now=100, max_streams=10) == 1


def test_pick_skips_dead_full_and_nearly_idle() -> None:
    conns = [Conn(usable=False), Conn(in_flight=10), Conn(last_heard=70.5), Conn(in_flight=9)]
    assert pool_policy.pick(conns, now=100, max_streams=10) == 3
    assert pool_policy.pick(conns[:3], now=100, max_streams=10) is None


def test_pick_respects_peer_stream_credit() -> None:
    conns = [Conn(in_flight=0, stream_credit=2), Conn(in_flight=4, stream_credit=50)]
    assert pool_policy.pick(conns, now=100, max_streams=10) == 1
    assert pool_policy.pick([Conn(stream_credit=0)], now=100, max_streams=10) is None


def test_pick_skips_connections_past_their_maximum_age() -> None:
    conns = [Conn(opened_at=0.0), Conn(opened_at=95.0, in_flight=5)]
    assert pool_policy.pick(conns, now=100, max_streams=10, max_age=50) == 1
    assert pool_policy.pick(conns, now=100, max_streams=10) == 0


def test_backoff_grows_and_resets() -> None:
    backoff = pool_policy.Backoff(base=0.5, cap=2.0)
    assert backoff.wait(0) == 0
    waits = []
    for _ in range(4):
        backoff.failed(10.0)
        waits.append(backoff.wait(10.0))
    assert waits == [0.5, 1.0, 2.0, 2.0]
    backoff.succeeded()
    assert backoff.wait(10.0) == 0
