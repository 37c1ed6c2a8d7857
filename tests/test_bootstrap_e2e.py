"""Upstreams by name: resolved through a --bootstrap plain DNS fixture (A and AAAA),
raced Happy-Eyeballs style, pinned instead of resolved, and never through ourselves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from doqproxy.upstream.bootstrap import (
    Bootstrap,
    BootstrapError,
    check_no_loop,
    happy_eyeballs,
    order_addresses,
)

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import rdatas


class _BootstrapProtocol(asyncio.DatagramProtocol):
    def __init__(self, records: dict[tuple[str, str], list[str]], seen: list[tuple[str, str]]):
        self.records = records
        self.seen = seen
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        self.seen.append((name, rdtype))
        response = dns.message.make_response(query)
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(dns.rrset.from_text(name, 300, "IN", rdtype, *values))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


class BootstrapServer:
    """Plain DNS on UDP answering A/AAAA for the upstream's name, recording queries."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.seen: list[tuple[str, str]] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _BootstrapProtocol(self.records, self.seen), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()


@pytest.fixture
async def bootstrap_server() -> AsyncIterator[BootstrapServer]:
    # AAAA points at ::1, where nothing listens: the IPv6 attempt fails and the
    # IPv4 one must win the race.
    server = BootstrapServer(
        {(f"{SERVER_NAME}.", "A"): ["127.0.0.1"], (f"{SERVER_NAME}.", "AAAA"): ["::1"]}
    )
    await server.start()
    yield server
    server.stop()


def _proxy(tmp_path: Path, certs: Certs, *args: str) -> ProxyProcess:
    port = free_port()
    argv = ["forward", "-l", f"127.0.0.1:{port}", "--tls-ca-file", certs.ca_file,
            "--state-dir", str(tmp_path / "state"), "--no-cache", "-vv", *args]  # fmt: skip
    proxy = ProxyProcess(argv, port, tmp_path / f"proxy-{port}.log")
    proxy.wait_ready()
    return proxy


async def _ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A", use_edns=0)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=15)


async def test_upstream_name_resolved_through_bootstrap(
    upstream: DoqTestUpstream, bootstrap_server: BootstrapServer, certs: Certs, tmp_path: Path
) -> None:
    proxy = await asyncio.to_thread(
        _proxy, tmp_path, certs,
        "-u", f"quic://{SERVER_NAME}:{upstream.port}",
        "--bootstrap", f"udp://127.0.0.1:{bootstrap_server.port}",
    )  # fmt: skip
    try:
        assert rdatas(await _ask(proxy.port, "a.test")) == ["192.0.2.1"]
        assert sorted(bootstrap_server.seen) == [
            (f"{SERVER_NAME}.", "A"),
            (f"{SERVER_NAME}.", "AAAA"),
        ]
        assert rdatas(await _ask(proxy.port, "n1.test")) == ["192.0.2.11"]
        assert len(bootstrap_server.seen) == 2  # kept for the TTL
        assert upstream.seen_names() == ["a.test.", "n1.test."]
    finally:
        proxy.stop()


async def test_pinned_addresses_are_used_without_lookup(
    upstream: DoqTestUpstream, bootstrap_server: BootstrapServer, certs: Certs, tmp_path: Path
) -> None:
    bootstrap_server.records[(f"{SERVER_NAME}.", "A")] = ["127.0.0.9"]  # would be wrong
    config = tmp_path / "pinned.toml"
    config.write_text(
        f'bootstrap = ["udp://127.0.0.1:{bootstrap_server.port}"]\n'
        "[[upstream]]\n"
        f'url = "quic://{SERVER_NAME}:{upstream.port}"\n'
        'addresses = ["127.0.0.1"]\n'
    )
    proxy = await asyncio.to_thread(_proxy, tmp_path, certs, "--config", str(config))
    try:
        assert rdatas(await _ask(proxy.port, "a.test")) == ["192.0.2.1"]
        assert bootstrap_server.seen == []
    finally:
        proxy.stop()
    cli = await asyncio.to_thread(
        _proxy, tmp_path, certs,
        "-u", f"quic://{SERVER_NAME}:{upstream.port}",
        "--upstream-address", f"{SERVER_NAME}=127.0.0.1",
    )  # fmt: skip
    try:
        assert rdatas(await _ask(cli.port, "n2.test")) == ["192.0.2.12"]
    finally:
        cli.stop()


def test_loop_guard_refuses_to_start(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# written by a test\nnameserver 127.0.0.1\n")
    env = dict(os.environ, DOQPROXY_RESOLV_CONF=str(resolv))
    result = subprocess.run(
        [sys.executable, "-m", "doqproxy", "forward", "-l", "127.0.0.1:53",
         "-u", "quic://dns.example"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "doqproxy itself" in lines[0] and "--bootstrap udp://" in lines[0]


def test_loop_guard_cases() -> None:
    ours = [("127.0.0.1", 53)]
    with pytest.raises(BootstrapError):
        check_no_loop(["dns.example"], ours, bootstrap=False, nameservers=["127.0.0.1"])
    with pytest.raises(BootstrapError):
        check_no_loop(["dns.example"], [("0.0.0.0", 53)], bootstrap=False,
                      nameservers=["127.0.0.1"])  # fmt: skip
    check_no_loop(["dns.example"], ours, bootstrap=True, nameservers=["127.0.0.1"])
    check_no_loop(["192.0.2.1"], ours, bootstrap=False, nameservers=["127.0.0.1"])
    check_no_loop(["dns.example"], ours, bootstrap=False, nameservers=["192.168.1.1"])
    check_no_loop(["dns.example"], [("127.0.0.1", 5353)], bootstrap=False,
                  nameservers=["127.0.0.1"])  # fmt: skip


def test_address_order_prefers_ipv6_and_interleaves() -> None:
    assert order_addresses(["192.0.2.1", "192.0.2.2", "2001:db8::1", "192.0.2.1"]) == [
        "2001:db8::1", "192.0.2.1", "192.0.2.2",
    ]  # fmt: skip


async def test_happy_eyeballs_first_success_wins_and_others_are_cancelled() -> None:
    cancelled: list[str] = []

    async def attempt(address: str) -> str:
        try:
            if address == "v6-black-hole":
                await asyncio.sleep(30)
            if address == "v6-refused":
                raise OSError("refused")
            await asyncio.sleep(0.01)
            return f"connected to {address}"
        except asyncio.CancelledError:
            cancelled.append(address)
            raise

    winner, result = await asyncio.wait_for(
        happy_eyeballs(["v6-black-hole", "v4"], attempt, delay=0.05), 5
    )
    assert (winner, result) == ("v4", "connected to v4")
    assert cancelled == ["v6-black-hole"]
    winner, _ = await happy_eyeballs(["v6-refused", "v4"], attempt, delay=10)
    assert winner == "v4"  # a failure starts the next attempt at once
    with pytest.raises(OSError, match="refused"):
        await happy_eyeballs(["v6-refused"], attempt)


async def test_bootstrap_cache_and_forget(bootstrap_server: BootstrapServer) -> None:
    bootstrap = Bootstrap([f"127.0.0.1:{bootstrap_server.port}"])
    found = await bootstrap.resolve(SERVER_NAME, 853)
    assert found == [("::1", 853), ("127.0.0.1", 853)]
    await bootstrap.resolve(SERVER_NAME, 853)
    assert bootstrap.lookups == 1
    bootstrap.failed(SERVER_NAME)
    await bootstrap.resolve(SERVER_NAME, 853)
    assert bootstrap.lookups == 2
