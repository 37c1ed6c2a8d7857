"""Happy Eyeballs with pinned addresses: the first address is a black hole (a UDP
socket that swallows every packet, so no ICMP error either), the second is the DoQ
upstream. Without racing, the first query would wait for the handshake timeout and
get SERVFAIL; with it, the second address wins. Both without a session ticket (the
handshakes race) and with one after a restart (the 0-RTT flight goes to the black
hole and the other address races it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import rcode_of, rdatas

BLACK_HOLE = "127.0.0.2"


@pytest.fixture
def black_hole(upstream: DoqTestUpstream) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((BLACK_HOLE, upstream.port))  # bound and never read: no ICMP, no answer
    yield sock
    sock.close()


async def _ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=30)


def _start(tmp_path: Path, certs: Certs, upstream: DoqTestUpstream, index: int) -> ProxyProcess:
    port = free_port()
    argv = [
        "forward", "-l", f"127.0.0.1:{port}", "--tls-ca-file", certs.ca_file,
        "-u", f"quic://{SERVER_NAME}:{upstream.port}",
        "--upstream-address", f"{SERVER_NAME}={BLACK_HOLE},127.0.0.1",
        "--timeout", "8", "--state-dir", str(tmp_path / "state"), "--no-cache", "-vv",
    ]  # fmt: skip
    proxy = ProxyProcess(argv, port, tmp_path / f"proxy-{index}.log")
    proxy.wait_ready()
    return proxy


async def test_black_holed_first_address_loses_the_race(
    upstream: DoqTestUpstream, black_hole: socket.socket, certs: Certs, tmp_path: Path
) -> None:
    proxy = await asyncio.to_thread(_start, tmp_path, certs, upstream, 0)
    try:
        reply = await _ask(proxy.port, "a.test")
        assert rcode_of(reply) == "NOERROR" and rdatas(reply) == ["192.0.2.1"], proxy.stderr()
        assert upstream.state.handshakes == 1
    finally:
        assert proxy.stop() == 0
    assert (tmp_path / "state").exists()

    # Restarted with the ticket: the first query leaves as 0-RTT to the black hole,
    # the other address races it and wins, and the query moves there.
    again = await asyncio.to_thread(_start, tmp_path, certs, upstream, 1)
    try:
        reply = await _ask(again.port, "n1.test")
        assert rcode_of(reply) == "NOERROR" and rdatas(reply) == ["192.0.2.11"], again.stderr()
        assert "127.0.0.2" in again.stderr()  # the black hole was tried first
    finally:
        again.stop()
