"""``doqproxy serve`` exposed to hostile clients: Initial floods, handshake and address caps,
cheap refusals, NOTIFY sources, the backend's sockets, privileges."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dns.message
import dns.opcode
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from doqproxy.doq.admission import Admission, AdmissionLimits
from doqproxy.frontend.doq_guard import GuardedQuicServer

from .conftest import free_port
from .nobody import NobodyPython
from .serve_helpers import (
    SERVER_NAME,
    RawConnection,
    RawDoqClient,
    ServeCerts,
    ServeProcess,
    client_configuration,
    query,
    rcode_of,
    rdatas,
    serve_certs,
    start_serve,
    zone_file,
)

__all__ = ["serve_certs", "start_serve", "zone_file"]  # fixtures used by name

pytestmark = pytest.mark.slow

NO_CAPS = ("--max-connections-per-ip", "100000", "--max-connections-per-prefix", "100000")


async def open_from(
    port: int, source: str, configuration: QuicConfiguration, wait: bool = True
) -> RawConnection:
    """Like serve_helpers.open_raw, from the loopback address ``source``."""
    loop = asyncio.get_running_loop()
    quic = QuicConnection(configuration=replace(configuration))
    transport, client = await loop.create_datagram_endpoint(
        lambda: RawDoqClient(quic), local_addr=(source, 0), remote_addr=("127.0.0.1", port)
    )
    client.connect(("127.0.0.1", port))
    if wait:
        await asyncio.wait_for(asyncio.shield(client.handshake), 10.0)
    return RawConnection(client, transport)


def flood(port: int, count: int, sources: int = 50, pause: float = 0.005) -> None:
    """Send ``count`` client Initials (real ClientHellos, one new connection each) and
    never answer anything that comes back: half-open handshakes, as an attacker leaves them."""
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=["doq"], server_name=SERVER_NAME, verify_mode=ssl.CERT_NONE
    )
    initials = []  # built first (the slow part), then sent in one burst
    for _ in range(count):
        quic = QuicConnection(configuration=replace(configuration))
        quic.connect(("127.0.0.1", port), now=time.monotonic())
        initials += [data for data, _ in quic.datagrams_to_send(now=time.monotonic())]
    socks = []
    for n in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.3.{n + 1}", 0))
        socks.append(sock)
    try:
        for n, data in enumerate(initials):
            socks[n % sources].sendto(data, ("127.0.0.1", port))
            if n % 50 == 49:
                time.sleep(pause)  # what the server's socket buffer can take
    finally:
        for sock in socks:
            sock.close()


def serve_zone(
    start: Callable[..., ServeProcess], certs: ServeCerts, zone: str, *extra: str
) -> ServeProcess:
    return start("--cert", certs.cert_file, "--key", certs.key_file, "--zone", zone, *extra)


async def test_initial_flood_does_not_lock_clients_out_retry_kicks_in(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    server = serve_zone(
        start_serve, serve_certs, zone_file,
        "--max-connections", "200", "--idle-timeout", "60", *NO_CAPS,
    )  # fmt: skip
    await asyncio.to_thread(flood, server.port, 1100, pause=0.05)
    connection = await open_from(
        server.port, "127.0.0.1", client_configuration(serve_certs.ca_file)
    )
    try:
        # Past the threshold of half-open handshakes, a new client answers a Retry first.
        assert connection.client._quic._retry_source_connection_id is not None
        assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    finally:
        connection.close()
    assert await asyncio.to_thread(server.stop) == 0
    stats = server.stats()
    # Past 32 half-open handshakes (the default threshold) the flood got Retries, not
    # state. (Some of its Initials are lost in the socket buffer on a busy machine.)
    assert int(stats["retries"]) >= 100, stats
    assert int(stats["connections"]) <= 40, stats


async def test_half_open_handshakes_time_out_and_free_their_slots(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    server = serve_zone(
        start_serve, serve_certs, zone_file,
        "--max-connections", "200", "--max-handshakes", "100", "--retry-threshold", "0",
        "--handshake-timeout", "3", "--idle-timeout", "60", *NO_CAPS,
    )  # fmt: skip
    # Paced so that the server's socket buffer keeps them (~2 s, far faster than the cap
    # of 100 handshakes per 3 s drains): the cap is full when the flood ends.
    await asyncio.to_thread(flood, server.port, 1100, pause=0.1)
    flooded = time.monotonic()
    configuration = client_configuration(serve_certs.ca_file)
    refused_first = False
    while True:
        attempt = await open_from(server.port, "127.0.0.1", configuration, wait=False)
        try:
            await asyncio.wait_for(asyncio.shield(attempt.client.handshake), 10)
            assert rdatas(await attempt.client.ask(query("www.example.test"))) == ["192.0.2.80"]
            break
        except ConnectionError:
            closed = attempt.client.terminated.result()
            assert closed.error_code == QuicErrorCode.CONNECTION_REFUSED
            assert closed.reason_phrase == "too many handshakes"
            refused_first = True
            # Before the fix the flood held every slot for the 60 s idle timeout.
            assert time.monotonic() - flooded < 20, "still locked out"
            await asyncio.sleep(0.3)
        finally:
            attempt.close()
    assert refused_first  # the cap held while the flood's handshakes were under way
    await asyncio.sleep(4)  # every flood handshake is over its timeout now
    assert await asyncio.to_thread(server.stop) == 0
    stats = server.stats()
    assert int(stats["handshake_timeouts"]) >= 100, stats
    assert stats["retries"] == "0"


async def test_per_address_and_per_prefix_caps(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    metrics_port = free_port()
    server = serve_zone(
        start_serve, serve_certs, zone_file,
        "--max-connections-per-ip", "2", "--max-connections-per-prefix", "3",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    configuration = client_configuration(serve_certs.ca_file)
    kept: list[RawConnection] = []

    async def refused(source: str) -> str:
        attempt = await open_from(server.port, source, configuration, wait=False)
        try:
            closed = await asyncio.wait_for(attempt.client.terminated, 10)
            assert closed.error_code == QuicErrorCode.CONNECTION_REFUSED
            return closed.reason_phrase
        finally:
            attempt.close()

    try:
        for source in ("127.0.1.1", "127.0.1.1", "127.0.1.2"):
            kept.append(await open_from(server.port, source, configuration))
        assert await refused("127.0.1.1") == "too many connections from this address"
        assert await refused("127.0.1.3") == "too many connections from this network"
        kept.append(await open_from(server.port, "127.0.2.1", configuration))
        for connection in kept:
            assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        exposed = text.decode()
        assert "doqproxy_serve_refused_total 2.0" in exposed
        assert "doqproxy_serve_active_connections 4.0" in exposed
        assert "doqproxy_serve_handshakes 0.0" in exposed
    finally:
        for connection in kept:
            connection.close()


async def test_refusal_creates_no_connection_and_does_no_tls(serve_certs: ServeCerts) -> None:
    """In-process: the refused client's Initial never reaches a QuicConnection."""
    loop = asyncio.get_running_loop()
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
    server_config.load_cert_chain(serve_certs.cert_file, serve_certs.key_file)
    created: list[str] = []
    refusals: list[tuple[str, str]] = []
    admission = Admission(AdmissionLimits(max_per_address=1, retry_threshold=None))

    def create(quic: QuicConnection, client: str) -> RawDoqClient:
        created.append(client)
        admission.opened(client)
        return RawDoqClient(quic)

    transport, _ = await loop.create_datagram_endpoint(
        lambda: GuardedQuicServer(
            admission=admission,
            create_connection=create,
            on_refused=lambda host, reason: refusals.append((host, reason)),
            configuration=server_config,
        ),
        local_addr=("127.0.0.1", 0),
    )
    port = transport.get_extra_info("sockname")[1]
    configuration = client_configuration(serve_certs.ca_file)
    first = await open_from(port, "127.0.4.1", configuration, wait=False)
    second = await open_from(port, "127.0.4.1", configuration, wait=False)
    try:
        closed = await asyncio.wait_for(second.client.terminated, 10)
        assert closed.error_code == QuicErrorCode.CONNECTION_REFUSED
        assert created == ["127.0.4.1"]
        assert refusals == [("127.0.4.1", "too many connections from this address")]
    finally:
        first.close()
        second.close()
        transport.close()


# --- serve --upstream ------------------------------------------------------------------


class SlowBackend(asyncio.DatagramProtocol):
    """A plain DNS server that never answers ``*.slow.test`` and answers the rest at once."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: set[int] = set()
        self.opcodes: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = dns.message.from_wire(data)
        self.sources.add(addr[1])
        self.opcodes.append(message.opcode())
        name = message.question[0].name.to_text()
        if name.endswith("slow.test."):
            return
        response = dns.message.make_response(message)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def slow_backend() -> tuple[SlowBackend, asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, backend = await loop.create_datagram_endpoint(
        SlowBackend, local_addr=("127.0.0.1", 0)
    )
    return backend, transport, transport.get_extra_info("sockname")[1]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_slow_backend_does_not_exhaust_file_descriptors(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, tmp_path: Path
) -> None:
    backend, transport, port = await slow_backend()
    server = ServeProcess(
        ["--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
         "-u", f"udp://127.0.0.1:{port}", "--timeout", "30", "--max-upstream-queries", "450"],
        tmp_path / "fds.log",
        prefix=["prlimit", "--nofile=128:128", "--"],
    )  # fmt: skip
    configuration = client_configuration(serve_certs.ca_file)
    connections: list[RawConnection] = []
    try:
        for _ in range(4):
            connections.append(await open_from(server.port, "127.0.0.1", configuration))
        for n, connection in enumerate(connections):
            for m in range(100):  # 400 slow queries: far more than 128 descriptors
                connection.client.send_query(query(f"q{n}-{m}.slow.test"))
                if m % 10 == 9:
                    await asyncio.sleep(0.05)  # let stream credit come back
        await asyncio.sleep(3)
        assert open_fds(server.proc.pid) < 64
        extra = await open_from(server.port, "127.0.0.1", configuration)
        connections.append(extra)
        fast = await extra.client.ask(query("fast.test"), within=10)
        assert rcode_of(fast) == "NOERROR", server.log()[-2000:]
        # Past --max-upstream-queries, a query fails at once rather than opening more.
        for m in range(60):
            extra.client.send_query(query(f"more{m}.slow.test"))
        await asyncio.sleep(1)
        answer = dns.message.from_wire(
            await extra.client.answer(
                extra.client.send_query(query("last.slow.test", use_edns=0)), 10
            )
        )
        assert rcode_of(answer) == "SERVFAIL"
        assert "too many queries in flight" in (answer.extended_errors()[0].text or "")
        assert len(backend.sources) <= 16  # shared sockets, not one per query
        assert "Too many open files" not in server.log()
    finally:
        for connection in connections:
            connection.close()
        code = await asyncio.to_thread(server.stop)
        transport.close()
    assert code == 0, server.log()


async def test_notify_only_from_allowed_sources(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts
) -> None:
    backend, transport, port = await slow_backend()
    notify = query("zone.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    configuration = client_configuration(serve_certs.ca_file)
    try:
        closed = start_serve(
            "--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
            "-u", f"udp://127.0.0.1:{port}",
        )  # fmt: skip
        opened = start_serve(
            "--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
            "-u", f"udp://127.0.0.1:{port}", "--allow-notify", "127.0.5.0/24",
        )  # fmt: skip
        for server, source, expected in (
            (closed, "127.0.5.1", "REFUSED"),
            (opened, "127.0.6.1", "REFUSED"),
            (opened, "127.0.5.1", "NOERROR"),
        ):
            connection = await open_from(server.port, source, configuration)
            try:
                answer = await connection.client.ask(notify)
                assert rcode_of(answer) == expected, (source, expected)
            finally:
                connection.close()
        assert backend.opcodes == [dns.opcode.NOTIFY]  # only the allowed one got through
    finally:
        transport.close()


def test_allow_notify_needs_upstream_and_a_cidr(serve_certs: ServeCerts, zone_file: str) -> None:
    base = [sys.executable, "-m", "doqproxy", "serve", "--cert", serve_certs.cert_file,
            "--key", serve_certs.key_file]  # fmt: skip
    for extra, needle in (
        (
            ["--zone", zone_file, "--allow-notify", "127.0.0.1"],
            "--allow-notify goes with --upstream",
        ),
        (["-u", "udp://127.0.0.1:53", "--allow-notify", "nonsense"], "not an address or CIDR"),
    ):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert needle in result.stderr and "Traceback" not in result.stderr


# --- privileges ------------------------------------------------------------------------


async def test_serve_user_drops_root_and_warns_only_as_root(
    start_serve: Callable[..., ServeProcess],
    serve_certs: ServeCerts,
    zone_file: str,
    nobody_python: NobodyPython,
) -> None:
    # The certificate, key and zone are read before the switch: root-only files are fine.
    dropped = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--user", "nobody", python=nobody_python,
    )  # fmt: skip
    as_root = serve_zone(start_serve, serve_certs, zone_file)
    status = await asyncio.to_thread(Path(f"/proc/{dropped.proc.pid}/status").read_text)
    uid = int(status.split("Uid:")[1].split()[1])
    assert uid == 65534
    connection = await open_from(
        dropped.port, "127.0.0.1", client_configuration(serve_certs.ca_file)
    )
    try:
        assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    finally:
        connection.close()
    assert "running as root" not in dropped.log()
    assert "WARNING" in as_root.log() and "running as root" in as_root.log()


async def test_options_as_environment_variables(
    start_serve: Callable[..., ServeProcess],
    serve_certs: ServeCerts,
    zone_file: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOQPROXY_SERVE_MAX_CONNECTIONS_PER_IP", "1")
    server = serve_zone(start_serve, serve_certs, zone_file)
    configuration = client_configuration(serve_certs.ca_file)
    first = await open_from(server.port, "127.0.7.1", configuration)
    second = await open_from(server.port, "127.0.7.1", configuration, wait=False)
    try:
        closed = await asyncio.wait_for(second.client.terminated, 10)
        assert closed.reason_phrase == "too many connections from this address"
    finally:
        first.close()
        second.close()


def test_bad_environment_value_is_one_line(serve_certs: ServeCerts, zone_file: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "doqproxy",
            "serve",
            "--cert",
            serve_certs.cert_file,
            "--key",
            serve_certs.key_file,
            "--zone",
            zone_file,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, DOQPROXY_SERVE_MAX_HANDSHAKES="many"),
    )
    assert result.returncode != 0
    assert "Invalid value for '--max-handshakes'" in result.stderr
    assert "Traceback" not in result.stderr
