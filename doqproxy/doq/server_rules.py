"""Server-side DoQ rules that need no sockets: what to do with one complete query.

The asyncio listener (:mod:`doqproxy.frontend.doq`) reassembles a stream with
:class:`doqproxy.doq.framing.StreamReader`, then asks :func:`admit` whether the query may
go to the resolver. The answer is one of three:

- raise :class:`~doqproxy.doq.framing.DoqProtocolError`: close the connection with
  DOQ_PROTOCOL_ERROR (message ID not 0, edns-tcp-keepalive; RFC 9250 §4.2.1, §5.5.2);
- return a reply: answer it without the resolver (a non-replayable query in 0-RTT);
- return ``None``: hand the query to the resolver.

0-RTT data can be replayed by an attacker (RFC 9250 §4.5, RFC 8446 §8). Only
opcodes whose replay is harmless are answered when they arrive as early data:
QUERY and NOTIFY. Anything else (UPDATE, for example) gets REFUSED with Extended
DNS Error 26 "Too Early" (RFC 9250 §4.5 allows this or a connection close; a reply
tells the client to ask again after the handshake, which costs it only one stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.doq import framing

REPLAYABLE_OPCODES = frozenset({wire.OPCODE_QUERY, wire.OPCODE_NOTIFY})
TOO_EARLY_TEXT = "not replayable, send it after the handshake"


NOTIFY_REFUSED_TEXT = "NOTIFY not accepted from this client"


def admit(message: bytes, *, early: bool, notify: bool = True) -> bytes | None:
    """Check one complete DoQ query; see the module docstring for the three outcomes.

    With ``notify=False`` (the client is not a listed NOTIFY source), NOTIFY is
    answered REFUSED rather than passed to the backend, which would see it coming
    from us.
    """
    if len(message) >= 2 and wire.get_id(message) != 0:
        raise framing.DoqProtocolError(f"message ID {wire.get_id(message)}, must be 0")
    try:
        question = wire.parse_question(message)
    except wire.WireError:
        # Malformed DNS is not a DoQ protocol error: the resolver answers FORMERR.
        return None
    framing.check_doq_query(question)
    if early and question.opcode not in REPLAYABLE_OPCODES:
        return wire.error_reply(question, wire.RCODE_REFUSED, ede=(Ede.TOO_EARLY, TOO_EARLY_TEXT))
    if question.opcode == wire.OPCODE_NOTIFY and not notify:
        return wire.error_reply(
            question, wire.RCODE_REFUSED, ede=(Ede.PROHIBITED, NOTIFY_REFUSED_TEXT)
        )
    return None


def wants_padding(message: bytes) -> bool:
    """The query carried an EDNS Padding option, so the response gets padded (RFC 8467)."""
    try:
        question = wire.parse_question(message)
    except wire.WireError:
        return False
    edns = question.edns
    return edns is not None and any(code == wire.OPTION_PADDING for code, _ in edns.options)


@dataclass(slots=True)
class DoqServerStats:
    """Counters of the DoQ listener, for logs and a metrics exporter.

    ``closes_sent`` and ``closes_received`` count connection closes by DoQ error
    code (0x0 NO_ERROR, 0x2 PROTOCOL_ERROR, ...), like CoreDNS's
    ``quic_responses_total``. Closes by the QUIC transport itself (a TLS alert, a
    flow-control violation, a refused connection) are counted in
    ``transport_closes`` by transport error code.
    """

    connections: int = 0
    """Connections accepted."""
    active: int = 0
    """Connections established now."""
    handshaking: int = 0
    """Handshakes under way now."""
    refused: int = 0
    """Connections refused before any TLS work (see :mod:`doqproxy.doq.admission`)."""
    retries: int = 0
    """Retry packets sent to validate a client's address."""
    handshake_timeouts: int = 0
    """Connections closed because their handshake did not complete in time."""
    streams: int = 0
    """Queries read completely."""
    early_queries: int = 0
    """Of those, how many arrived as 0-RTT data."""
    too_early: int = 0
    """Queries refused with EDE 26 because they arrived as 0-RTT data."""
    refused_queries: int = 0
    """Queries answered REFUSED here: too early, or NOTIFY from a client not listed."""
    stream_timeouts: int = 0
    """Streams reset because the query did not arrive within the read deadline."""
    streams_cancelled: int = 0
    """Streams the client reset or stopped before it got the answer."""
    idle_timeouts: int = 0
    closes_sent: dict[int, int] = field(default_factory=dict)
    closes_received: dict[int, int] = field(default_factory=dict)
    transport_closes: dict[int, int] = field(default_factory=dict)

    def count_close(self, table: dict[int, int], code: int) -> None:
        table[int(code)] = table.get(int(code), 0) + 1
