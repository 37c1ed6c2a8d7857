"""A DoQ test upstream built directly on aioquic, independent of ``doqproxy serve``.

It answers from a small in-memory zone and records what it saw, so tests can
assert on the upstream side (message IDs, padding, options, early data).
Special names change its behaviour:

- ``reset.test.``: the stream is reset with DOQ_INTERNAL_ERROR.
- ``slow.test.``: the answer is delayed by ``slow_delay`` seconds.
- ``split.test.``: the answer is written in 40-octet pieces, one packet each.
- ``big.test.`` TXT: a 16 KB answer; ``mid.test.`` TXT: about 800 octets.
- ``badid.test.``: the answer carries Message ID 0x1234 (RFC 9250 forbids it).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import SessionTicket

ZONE: dict[tuple[str, str], list[str]] = {
    ("a.test.", "A"): ["192.0.2.1"],
    ("a.test.", "AAAA"): ["2001:db8::1"],
    ("a.test.", "TXT"): ['"hello world"'],
    ("a.test.", "MX"): ["10 mail.a.test."],
    ("split.test.", "TXT"): [f'"{i:03d}{"x" * 200}"' for i in range(5)],
    ("mid.test.", "TXT"): [f'"{i:03d}{"m" * 247}"' for i in range(3)],
    ("big.test.", "TXT"): [f'"{i:03d}{"b" * 247}"' for i in range(64)],
    ("slow.test.", "A"): ["192.0.2.9"],
    ("badid.test.", "A"): ["192.0.2.66"],
}
for _i in range(64):
    ZONE[(f"n{_i}.test.", "A")] = [f"192.0.2.{_i + 10}"]


@dataclass
class Seen:
    """One query as the upstream received it."""

    wire: bytes
    message: dns.message.Message
    early: bool


@dataclass
class UpstreamState:
    seen: list[Seen] = field(default_factory=list)
    tickets: dict[bytes, SessionTicket] = field(default_factory=dict)
    handshakes: int = 0
    early_accepted: int = 0
    close_codes: list[int] = field(default_factory=list)
    slow_delay: float = 3.0
    answer_delay: float = 0.0
    """Seconds every answer waits (a slow server, not a slow link)."""
    cancelled: list[tuple[str, int]] = field(default_factory=list)
    """("reset" or "stop", code) for each RESET_STREAM / STOP_SENDING received."""


def answer(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name = question.name.to_text().lower()
    rdtype = dns.rdatatype.to_text(question.rdtype)
    records = ZONE.get((name, rdtype))
    if records:
        response.answer.append(dns.rrset.from_text(question.name, 300, "IN", rdtype, *records))
    elif not any(key[0] == name for key in ZONE):
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(
            dns.rrset.from_text("test.", 300, "IN", "SOA", "ns.test. host.test. 1 2 3 4 60")
        )
    return response


class _DoqServerProtocol(QuicConnectionProtocol):
    state: UpstreamState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[int, bytes] = {}
        self._handshake_done = False
        self._tasks: set[asyncio.Task[None]] = set()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_done = True
            self.state.handshakes += 1
            self.state.early_accepted += bool(event.early_data_accepted)
        elif isinstance(event, events.ConnectionTerminated):
            self.state.close_codes.append(event.error_code)
        elif isinstance(event, events.StreamReset):
            self.state.cancelled.append(("reset", event.error_code))
        elif isinstance(event, events.StopSendingReceived):
            self.state.cancelled.append(("stop", event.error_code))
        elif isinstance(event, events.StreamDataReceived):
            data = self._buffers.get(event.stream_id, b"") + event.data
            self._buffers[event.stream_id] = data
            if event.end_stream:
                del self._buffers[event.stream_id]
                early = not self._handshake_done
                task = asyncio.ensure_future(self._handle(event.stream_id, data[2:], early))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, stream_id: int, wire: bytes, early: bool) -> None:
        query = dns.message.from_wire(wire)
        self.state.seen.append(Seen(wire, query, early))
        name = query.question[0].name.to_text().lower()
        quic = self._quic
        if name == "reset.test.":
            quic.reset_stream(stream_id, 0x1)
            self.transmit()
            return
        if name == "slow.test.":
            await asyncio.sleep(self.state.slow_delay)
        if self.state.answer_delay:
            await asyncio.sleep(self.state.answer_delay)
            if (
                stream_id in quic._streams
                and quic._streams[stream_id].sender._reset_error_code is not None
            ):
                return  # the client cancelled (STOP_SENDING reset our side)
        reply = answer(query)
        if name == "badid.test.":
            reply.id = 0x1234
        response = reply.to_wire(max_size=65535)
        framed = struct.pack("!H", len(response)) + response
        if name == "split.test.":
            for offset in range(0, len(framed), 40):
                chunk = framed[offset : offset + 40]
                quic.send_stream_data(stream_id, chunk, end_stream=offset + 40 >= len(framed))
                self.transmit()
                await asyncio.sleep(0)
            return
        quic.send_stream_data(stream_id, framed, end_stream=True)
        self.transmit()


class DoqTestUpstream:
    """Start with :meth:`start`, stop with :meth:`stop`; restartable on the same port."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        port: int = 0,
        *,
        max_streams: int | None = None,
        **options: Any,
    ) -> None:
        self.max_streams = max_streams
        self.cert_file = cert_file
        self.key_file = key_file
        self.port = port
        self.options = options
        self.state = UpstreamState()
        self.server: QuicServer | None = None

    async def start(self) -> None:
        configuration = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
        configuration.load_cert_chain(self.cert_file, self.key_file)
        state = self.state

        def create_protocol(*args: Any, **kwargs: Any) -> _DoqServerProtocol:
            protocol = _DoqServerProtocol(*args, **kwargs)
            protocol.state = state
            if self.max_streams is not None:
                limit = protocol._quic._local_max_streams_bidi
                limit.value = limit.sent = self.max_streams
            return protocol

        self.server = await serve(
            "127.0.0.1",
            self.port,
            configuration=configuration,
            create_protocol=create_protocol,
            session_ticket_fetcher=lambda label: state.tickets.pop(label, None),
            session_ticket_handler=lambda t: state.tickets.__setitem__(t.ticket, t),
            **self.options,
        )
        self.port = self.server._transport.get_extra_info("sockname")[1]

    def close_all_connections(self, code: int = 0) -> None:
        assert self.server is not None
        for protocol in set(self.server._protocols.values()):
            protocol.close(error_code=code)

    def forget_tickets(self) -> None:
        """Like a server restart for TLS: resumption fails and 0-RTT is rejected."""
        self.state.tickets.clear()

    def seen_names(self) -> list[str]:
        return [seen.message.question[0].name.to_text() for seen in self.state.seen]

    async def stop(self) -> None:
        if self.server is not None:
            self.close_all_connections()
            await asyncio.sleep(0.05)
            self.server.close()
            self.server = None
            await asyncio.sleep(0.05)  # the socket is released on the next loop turn

    def ids_seen(self) -> list[int]:
        return [struct.unpack("!H", seen.wire[:2])[0] for seen in self.state.seen]

    @staticmethod
    def edns_options(seen: Seen) -> list[dns.edns.Option]:
        return list(seen.message.options)
