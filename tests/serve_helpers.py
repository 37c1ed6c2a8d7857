"""Helpers for the ``doqproxy serve`` tests: certificates, a test zone, the server
process, a raw aioquic DoQ client and a small plain DNS server (UDP and TCP)."""

from __future__ import annotations

import asyncio
import re
import ssl
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trustme
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from .conftest import ManagedProcess
from .nobody import NobodyPython

SERVER_NAME = "serve.doq.test"

ZONE_TEXT = """\
$ORIGIN example.test.
$TTL 300
@      IN SOA ns1 hostmaster 1 3600 600 86400 60
       IN NS  ns1
       IN MX  10 mail
ns1    IN A   192.0.2.53
www    IN A   192.0.2.80
       IN AAAA 2001:db8::80
mail   IN A   192.0.2.25
alias  IN CNAME www
out    IN CNAME www.elsewhere.invalid.
*.wild IN A   192.0.2.99
a.b.c  IN A   192.0.2.3
sub    IN NS  ns.sub
ns.sub IN A   192.0.2.54
"""


@dataclass(frozen=True)
class ServeCerts:
    ca_file: str
    cert_file: str
    key_file: str


def make_certs(directory: Path) -> ServeCerts:
    """A throwaway CA and a server certificate for SERVER_NAME, written as PEM."""
    ca = trustme.CA()
    server = ca.issue_cert(SERVER_NAME, "127.0.0.1")
    certs = ServeCerts(
        ca_file=str(directory / "ca.pem"),
        cert_file=str(directory / "server.pem"),
        key_file=str(directory / "server.key"),
    )
    ca.cert_pem.write_to_path(certs.ca_file)
    server.private_key_pem.write_to_path(certs.key_file)
    with open(certs.cert_file, "wb") as handle:
        for blob in server.cert_chain_pems:
            handle.write(blob.bytes())
    return certs


@pytest.fixture(scope="module")
def serve_certs(tmp_path_factory: pytest.TempPathFactory) -> ServeCerts:
    return make_certs(tmp_path_factory.mktemp("serve-certs"))


@pytest.fixture(scope="module")
def zone_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("zone") / "example.test.zone"
    path.write_text(ZONE_TEXT)
    return str(path)


# --- the server process -------------------------------------------------------------

_LISTENING = re.compile(r"listening on quic://127\.0\.0\.1:(\d+)")


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "doqproxy", "serve", *args]


class ServeProcess(ManagedProcess):
    """``doqproxy serve`` on 127.0.0.1, port chosen by the kernel; stopped by its own handle."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        prefix: list[str] | None = None,
        python: NobodyPython | None = None,
    ) -> None:
        """``prefix``: a command to run it under, e.g. prlimit; ``python``: an interpreter
        that ``nobody`` can run it with (for ``--user nobody``, see tests/nobody.py)."""
        serve_args = ("serve", "-l", "127.0.0.1:0", "-v", *args)
        if python is None:
            argv = [*(prefix or []), *serve_command(*serve_args[1:])]
            super().__init__(argv, log_path)
        else:
            argv = [*(prefix or []), *python.command(*serve_args)]
            super().__init__(argv, log_path, python.environ())
        self.log_path = log_path
        self.port = self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"doqproxy serve exited early:\n{self.log()}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"doqproxy serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.stderr()

    def stats(self) -> dict[str, str]:
        """The counters the server logged when it stopped."""
        match = re.search(r"stopped: DoqServerStats\((.*)\)", self.log())
        assert match, self.log()
        return dict(re.findall(r"(\w+)=(\{[^}]*\}|[^,]+)", match.group(1)))


@pytest.fixture(scope="module")
def start_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``doqproxy serve`` processes; all are stopped, and must exit 0, at teardown."""
    started: list[ServeProcess] = []
    directory = tmp_path_factory.mktemp("serve-logs")

    def start(*args: str, python: NobodyPython | None = None) -> ServeProcess:
        server = ServeProcess(list(args), directory / f"serve-{len(started)}.log", python=python)
        started.append(server)
        return server

    yield start
    codes = [(server.stop(), server) for server in started]  # all stopped first
    for code, server in codes:
        assert code == 0, server.log()


# --- a raw DoQ client ---------------------------------------------------------------


class StreamResetError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"stream reset with 0x{code:x}")
        self.code = code


class RawDoqClient(QuicConnectionProtocol):
    """An aioquic client that sends whatever bytes a test wants and records what comes back."""

    def __init__(self, quic: QuicConnection, stream_handler: object = None) -> None:
        super().__init__(quic)
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[events.HandshakeCompleted] = loop.create_future()
        self.terminated: asyncio.Future[events.ConnectionTerminated] = loop.create_future()
        self.answers: dict[int, asyncio.Future[bytes]] = {}
        self._buffers: dict[int, bytearray] = {}
        self.remote_max_streams_at_handshake: int | None = None
        self.datagrams = 0
        """Datagrams received from the server."""

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.datagrams += 1
        super().datagram_received(data, addr)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.remote_max_streams_at_handshake = self._quic._remote_max_streams_bidi
            if not self.handshake.done():
                self.handshake.set_result(event)
        elif isinstance(event, events.StreamDataReceived):
            buffer = self._buffers.setdefault(event.stream_id, bytearray())
            buffer += event.data
            answer = self.answers.get(event.stream_id)
            if event.end_stream and answer is not None and not answer.done():
                answer.set_result(bytes(buffer))
        elif isinstance(event, events.StreamReset):
            answer = self.answers.get(event.stream_id)
            if answer is not None and not answer.done():
                answer.set_exception(StreamResetError(event.error_code))
        elif isinstance(event, events.ConnectionTerminated):
            for answer in self.answers.values():
                if not answer.done():
                    answer.set_exception(ConnectionError(event.reason_phrase))
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionError(event.reason_phrase))
            if not self.terminated.done():
                self.terminated.set_result(event)

    def send_raw(self, data: bytes, *, end_stream: bool = True, uni: bool = False) -> int:
        """Open the next stream, write ``data`` and return the stream ID."""
        sid = self._quic.get_next_available_stream_id(is_unidirectional=uni)
        self.answers[sid] = asyncio.get_running_loop().create_future()
        self._quic.send_stream_data(sid, data, end_stream=end_stream)
        self.transmit()
        return sid

    def send_query(self, message: dns.message.Message | bytes) -> int:
        wire = message if isinstance(message, bytes) else message.to_wire()
        return self.send_raw(struct.pack("!H", len(wire)) + wire)

    async def answer(self, sid: int, within: float = 5.0) -> bytes:
        """The answer on ``sid`` without its length prefix (checked)."""
        data = await asyncio.wait_for(self.answers[sid], within)
        (length,) = struct.unpack("!H", data[:2])
        assert length == len(data) - 2, "answer length prefix does not match"
        return data[2:]

    async def ask(self, message: dns.message.Message, within: float = 5.0) -> dns.message.Message:
        return dns.message.from_wire(await self.answer(self.send_query(message), within))


def client_configuration(
    ca_file: str, *, alpn: str = "doq", ticket: SessionTicket | None = None
) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn],
        server_name=SERVER_NAME,
        cafile=ca_file,
        verify_mode=ssl.CERT_REQUIRED,
        session_ticket=ticket,
        idle_timeout=30.0,
    )


@dataclass
class RawConnection:
    client: RawDoqClient
    transport: asyncio.DatagramTransport
    tickets: list[SessionTicket] = field(default_factory=list)
    ticket_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        self.client.close()
        self.transport.close()

    async def ticket(self, within: float = 5.0) -> SessionTicket:
        """The newest session ticket, waiting for one to arrive (it follows the handshake)."""
        await asyncio.wait_for(self.ticket_arrived.wait(), within)
        return self.tickets[-1]


async def open_raw(
    port: int,
    configuration: QuicConfiguration,
    *,
    early: Callable[[RawDoqClient], None] | None = None,
    wait: bool = True,
) -> RawConnection:
    """Connect to 127.0.0.1:``port``. ``early`` writes streams before the first packet
    goes out, so they travel as 0-RTT data when the configuration carries a ticket."""
    loop = asyncio.get_running_loop()
    tickets: list[SessionTicket] = []
    arrived = asyncio.Event()

    def new_ticket(ticket: SessionTicket) -> None:
        tickets.append(ticket)
        arrived.set()

    quic = QuicConnection(configuration=replace(configuration), session_ticket_handler=new_ticket)
    transport, client = await loop.create_datagram_endpoint(
        lambda: RawDoqClient(quic), remote_addr=("127.0.0.1", port)
    )
    client.connect(("127.0.0.1", port), transmit=False)
    if early is not None:
        early(client)
    client.transmit()
    if wait:
        await asyncio.wait_for(asyncio.shield(client.handshake), 5.0)
    return RawConnection(client, transport, tickets, arrived)


def query(name: str, rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    """A query with ID 0, as DoQ wants it."""
    message = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    message.id = 0
    return message


# --- a plain DNS server (UDP and TCP) for --upstream ------------------------------


@dataclass
class PlainServerState:
    """What the plain server saw: (transport, message ID, name) per query."""

    seen: list[tuple[str, int, str]] = field(default_factory=list)
    padded: list[bool] = field(default_factory=list)
    """Per query: did it carry an EDNS Padding option?"""


def plain_answer(wire: bytes, transport: str, state: PlainServerState) -> list[bytes]:
    """Answers for one query. ``big.plain.test`` is truncated over UDP;
    ``spoof.plain.test`` is first answered with a wrong ID and a wrong address."""
    query_message = dns.message.from_wire(wire)
    name = query_message.question[0].name.to_text()
    state.seen.append((transport, query_message.id, name))
    state.padded.append(any(option.otype == dns.edns.PADDING for option in query_message.options))
    response = dns.message.make_response(query_message)
    if name == "big.plain.test." and transport == "udp":
        response.flags |= dns.flags.TC
        return [response.to_wire()]
    if name == "big.plain.test.":
        first, second = (" ".join(f'"{c * 200}"' for _ in range(4)) for c in "xy")
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", first, second))
        return [response.to_wire(max_size=65535)]
    if name.endswith("plain.test."):
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "198.51.100.7"))
    else:
        response.set_rcode(dns.rcode.REFUSED)
    replies = [response.to_wire()]
    if name == "spoof.plain.test.":
        bogus = dns.message.make_response(query_message)
        bogus.id = (query_message.id + 1) % 65536
        bogus.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "203.0.113.66"))
        replies.insert(0, bogus.to_wire())
    return replies


class _PlainUdp(asyncio.DatagramProtocol):
    def __init__(self, state: PlainServerState) -> None:
        self.state = state
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for reply in plain_answer(data, "udp", self.state):
            self.transport.sendto(reply, addr)


class PlainDnsServer:
    """A tiny authoritative-ish server for ``*.plain.test`` on UDP and TCP, same port."""

    def __init__(self) -> None:
        self.state = PlainServerState()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", 0)
            self.port = self._tcp.sockets[0].getsockname()[1]
            try:
                self._udp, _ = await loop.create_datagram_endpoint(
                    lambda: _PlainUdp(self.state), local_addr=("127.0.0.1", self.port)
                )
                return
            except OSError:  # the UDP port is taken; try another pair
                self._tcp.close()
        raise RuntimeError("no free UDP+TCP port pair")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                for reply in plain_answer(await reader.readexactly(length), "tcp", self.state):
                    writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()


def rcode_of(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())


def rdatas(message: dns.message.Message, rdtype: str = "A") -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return [rd.to_text() for rrset in message.answer if rrset.rdtype == kind for rd in rrset]
