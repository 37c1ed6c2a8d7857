"""One DoQ query with a timing breakdown and TLS details: the logic behind ``doqproxy query``.

The probe drives a single :class:`~doqproxy.upstream.doq_connection.DoqConnection` by hand so
that it can time each phase separately:

- *connect*: resolving the upstream's name and opening the UDP socket;
- *handshake*: from the first flight to ``HandshakeCompleted``;
- *first byte*: from sending the query to the first octet of the answer stream;
- *total*: from start to the complete answer.

With ``zero_rtt`` and a stored session ticket the query is written before the
first flight, so it rides along as 0-RTT early data; otherwise the probe waits
for the handshake before it sends the query, so the handshake and first-byte
figures do not overlap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from doqproxy.doq import framing
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import DoqConnection, client_configuration
from doqproxy.upstream.tickets import TicketFile, upstream_key


class ProbeError(Exception):
    """The probe failed; the message is one line for the user."""


@dataclass(slots=True, frozen=True)
class ProbeSettings:
    """What to ask, where, and how."""

    qname: str
    qtype: str
    upstream: UpstreamUrl
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    state_dir: Path | None = None
    zero_rtt: bool = False
    timeout: float = 5.0
    dnssec: bool = False
    pad_block: int | None = 128


@dataclass(slots=True)
class ProbeResult:
    """What one probe saw. Times are in seconds; ``None`` where a phase did not happen."""

    address: tuple[str, int]
    server_name: str
    response: dns.message.Message
    wire_size: int
    connect: float
    handshake: float | None
    first_byte: float | None
    total: float
    session_resumed: bool | None
    early_data_sent: bool
    early_data_accepted: bool | None
    alpn: str | None
    tls_version: str | None
    cipher: str | None
    ticket_offered: bool
    tickets_saved: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rcode(self) -> str:
        return dns.rcode.to_text(self.response.rcode())


def build_query(settings: ProbeSettings) -> bytes:
    """The DoQ query: message ID 0 (RFC 9250 §4.2.1), EDNS0, padded (RFC 8467)."""
    try:
        rdtype = dns.rdatatype.from_text(settings.qtype)
    except dns.rdatatype.UnknownRdatatype:
        raise ProbeError(f"unknown query type {settings.qtype!r} (try A, AAAA, MX, TXT)") from None
    try:
        message = dns.message.make_query(
            settings.qname,
            rdtype,
            dns.rdataclass.IN,
            use_edns=0,
            want_dnssec=settings.dnssec,
            payload=1232,
            pad=settings.pad_block or 0,
            id=0,
        )
    except Exception as exc:  # dnspython raises several types for bad names
        raise ProbeError(f"bad query name {settings.qname!r}: {exc}") from None
    return message.to_wire()


async def probe(settings: ProbeSettings) -> ProbeResult:
    """Ask one question over a fresh DoQ connection (raises :class:`ProbeError`)."""
    try:
        async with asyncio.timeout(settings.timeout):
            return await _probe(settings)
    except TimeoutError:
        raise ProbeError(
            f"timeout: no answer from {settings.upstream} within {settings.timeout:g}s"
        ) from None


async def _probe(settings: ProbeSettings) -> ProbeResult:
    query = build_query(settings)
    url = settings.upstream
    server_name = settings.tls_server_name or url.host
    started = time.monotonic()
    address = await _resolve(url)
    try:
        configuration = client_configuration(server_name, ca_file=settings.tls_ca_file)
    except (OSError, ValueError) as exc:
        raise ProbeError(f"--tls-ca-file {settings.tls_ca_file}: {exc}") from None
    # The same file and keys as ``doqproxy forward --state-dir``.
    tickets = TicketFile(settings.state_dir) if settings.state_dir else None
    ticket_key = upstream_key(server_name, url.host, url.port)
    saved: list[int] = [0]
    if tickets is not None:
        configuration = dataclasses.replace(configuration)
        configuration.session_ticket = tickets.take(ticket_key)

    def keep_ticket(ticket: Any) -> None:
        if tickets is not None:
            tickets.add(ticket_key, ticket)
            saved[0] += 1

    conn = DoqConnection(address, configuration, ticket_handler=keep_ticket)
    await conn.open()
    connected = time.monotonic()
    try:
        if settings.zero_rtt and conn.resumable:
            sent = connected
            answer = await conn.query(query)
        else:
            conn.flush()
            await conn.handshake_done
            sent = time.monotonic()
            answer = await conn.query(query)
        done = time.monotonic()
        # Give a ticket sent after the answer a moment to arrive before closing.
        if tickets is not None and not saved[0]:
            await asyncio.sleep(0.05)
    except UpstreamError as exc:
        raise ProbeError(str(exc)) from None
    finally:
        conn.close(framing.DoqError.NO_ERROR, "done")
        await conn.wait_closed(grace=0.5)
        if tickets is not None:
            tickets.save()
    info = conn.info
    cipher = conn.cipher
    try:
        response = dns.message.from_wire(answer)
    except Exception as exc:
        raise ProbeError(f"the answer from {url} is not a valid DNS message: {exc}") from None
    notes = []
    if settings.zero_rtt and configuration.session_ticket is None:
        notes.append("no stored session ticket, so no 0-RTT (run once with --state-dir first)")
    return ProbeResult(
        address=address,
        server_name=server_name,
        response=response,
        wire_size=len(answer),
        connect=connected - started,
        handshake=None if info.handshake_at is None else info.handshake_at - connected,
        first_byte=None if info.first_byte_at is None else info.first_byte_at - sent,
        total=done - started,
        session_resumed=info.session_resumed,
        early_data_sent=info.early_data_sent,
        early_data_accepted=info.early_data_accepted,
        alpn=info.alpn,
        # QUIC is TLS 1.3 only (RFC 9001), so a completed handshake means 1.3.
        tls_version="TLSv1.3" if info.handshake_at is not None else None,
        cipher=cipher,
        ticket_offered=configuration.session_ticket is not None,
        tickets_saved=saved[0],
        notes=notes,
    )


async def _resolve(url: UpstreamUrl) -> tuple[str, int]:
    if url.is_ip:
        return url.host, url.port
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(url.host, url.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ProbeError(f"cannot resolve {url.host}: {exc.strerror or exc}") from None
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])
