"""Review findings in the upstream side: each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from click.testing import CliRunner

from doqproxy.cli import main
from doqproxy.dns import wire
from doqproxy.net.addresses import AddressError, parse_upstream
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.bootstrap import Bootstrap, check_no_loop
from doqproxy.upstream.health import Health, State
from doqproxy.upstream.health_file import HealthFile
from doqproxy.upstream.plain import PlainUpstream

from .conftest import doqproxy_command, free_port


def make(name: str) -> tuple[bytes, wire.Question]:
    message = dns.message.make_query(name, "A")
    message.id = 0
    data = message.to_wire()
    return data, wire.parse_question(data)


def closed_udp_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_plain_upstream_does_not_leak_a_socket_per_refused_query() -> None:
    """A backend that is down (ICMP port unreachable) dropped the shared socket from
    its slot without closing it: one file descriptor leaked per failed query."""
    upstream = PlainUpstream(parse_upstream(f"udp://127.0.0.1:{closed_udp_port()}", ("udp",)))
    data, question = make("down.example.")
    before = open_fds()
    failures = 0
    for _ in range(60):
        try:
            await asyncio.wait_for(upstream.query(data, question), 5)
        except UpstreamError:
            failures += 1
    await upstream.aclose()
    assert failures == 60
    assert open_fds() - before <= 2


def write_state(directory: Path, record: str) -> None:
    directory.mkdir(mode=0o700, exist_ok=True)
    body = '{"version": 1, "saved": %f, "upstreams": {"quic://a:853": %s}}'
    (directory / "upstreams.json").write_text(body % (time.time(), record))


def test_health_file_with_out_of_range_numbers_is_ignored(tmp_path: Path) -> None:
    """JSON allows 1e400 (infinity) and 400-digit integers; int()/float() of them
    raise OverflowError, which escaped restore() and stopped start-up."""
    for record in (
        '{"state": "backoff", "backoffs": 1e400, "saved": 1}',
        '{"state": "backoff", "retry_in": %s, "saved": 1}' % ("9" * 400),
        '{"state": "backoff", "saved": %s}' % ("9" * 400),
    ):
        write_state(tmp_path / "state", record)
        health = Health()
        HealthFile(tmp_path / "state").restore("quic://a:853", health, time.monotonic())
        assert health.state is State.UP
        assert json.loads((tmp_path / "state" / "upstreams.json").read_text())


class GarbledBootstrap(asyncio.DatagramProtocol):
    """Answers with the right ID and question, then one answer record cut short."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        reply = dns.message.make_response(dns.message.from_wire(data)).to_wire()
        reply = reply[:6] + b"\x00\x01" + reply[8:]  # ANCOUNT 1 ...
        reply += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01"  # ... RDATA cut
        self.transport.sendto(reply, addr)


async def test_bootstrap_with_a_malformed_answer_is_an_upstream_error() -> None:
    """A garbled bootstrap answer raised dnspython's FormError out of resolve(): the
    query ended as SERVFAIL 'internal error' with a traceback in the log."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        GarbledBootstrap, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        bootstrap = Bootstrap([f"127.0.0.1:{port}"], timeout=2.0)
        with pytest.raises(UpstreamError, match=r"cannot resolve dns\.example"):
            await bootstrap.resolve("dns.example", 853)
    finally:
        transport.close()


def test_an_internationalised_upstream_name_uses_its_a_label() -> None:
    """``-u quic://bücher.example`` crashed forward at start-up (aioquic's SNI is ASCII
    only: UnicodeEncodeError traceback); one the idna codec cannot encode crashed
    ``doqproxy query`` in getaddrinfo."""
    assert parse_upstream("quic://bücher.example").host == "xn--bcher-kva.example"
    with pytest.raises(AddressError, match="not a valid host name"):
        parse_upstream("quic://" + "é" * 70 + ".example")
    result = CliRunner().invoke(
        main, ["query", "example.com", "-u", "quic://" + "é" * 70, "--timeout", "1"]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "not a valid host name" in result.output


def test_a_bootstrap_that_is_our_own_listener_refuses_to_start(tmp_path: Path) -> None:
    """The loop guard only looked at resolv.conf: ``--bootstrap`` naming one of our own
    listen addresses started, and every upstream lookup went through ourselves."""
    port = free_port()
    for listen, bootstrap in (
        (f"127.0.0.1:{port}", f"udp://127.0.0.1:{port}"),
        (f"0.0.0.0:{port}", f"udp://127.0.0.7:{port}"),
    ):
        done = subprocess.run(
            doqproxy_command(
                "forward", "-l", listen, "-u", "quic://dns.example", "--bootstrap", bootstrap,
                "--state-dir", str(tmp_path / "state"),
            ),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0
        assert "is doqproxy itself" in done.stderr
        assert "Traceback" not in done.stderr
    check_no_loop(["dns.example"], [("127.0.0.1", port)], bootstrap=True, servers=["127.0.0.1:53"])


class NoAaaaBootstrap(asyncio.DatagramProtocol):
    """Answers A with 127.0.0.9 and never answers AAAA (as some home routers do)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        query = dns.message.from_wire(data)
        if query.question[0].rdtype != dns.rdatatype.A:
            return
        reply = dns.message.make_response(query)
        reply.answer.append(
            dns.rrset.from_text(query.question[0].name, 300, "IN", "A", "127.0.0.9")
        )
        self.transport.sendto(reply.to_wire(), addr)


async def test_bootstrap_uses_the_a_records_when_aaaa_gets_no_answer() -> None:
    """A and AAAA were asked together and both had to succeed: a bootstrap server that
    ignores AAAA made every lookup fail after the timeout, though A had answered."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(NoAaaaBootstrap, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        bootstrap = Bootstrap([f"127.0.0.1:{port}"], timeout=1.5)
        assert await bootstrap.resolve("dns.example", 853) == [("127.0.0.9", 853)]
    finally:
        transport.close()
