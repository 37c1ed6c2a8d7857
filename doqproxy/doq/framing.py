"""DNS-over-QUIC framing and validation (RFC 9250), without any I/O.

Each query travels on its own client-initiated bidirectional stream as one
2-octet length-prefixed message, and each side ends the stream with FIN.
"""

from __future__ import annotations

import enum
import struct

from doqproxy.dns import wire

ALPN = "doq"
DEFAULT_PORT = 853


class DoqError(enum.IntEnum):
    """DoQ application error codes (RFC 9250 §4.3)."""

    NO_ERROR = 0x0
    INTERNAL_ERROR = 0x1
    PROTOCOL_ERROR = 0x2
    REQUEST_CANCELLED = 0x3
    EXCESSIVE_LOAD = 0x4
    UNSPECIFIED_ERROR = 0x5


class DoqProtocolError(Exception):
    """The peer broke RFC 9250; the connection must close with DOQ_PROTOCOL_ERROR."""


def frame(message: bytes) -> bytes:
    """Prefix a DNS message with its 2-octet length."""
    if not 0 < len(message) <= wire.MAX_MESSAGE:
        raise ValueError(f"DNS message of {len(message)} octets cannot be framed")
    return struct.pack("!H", len(message)) + message


class StreamReader:
    """Reassembles the one message a DoQ stream carries, whatever frames it arrives in.

    Feed it each ``StreamDataReceived``; it returns the message once the stream
    has ended, and raises :class:`DoqProtocolError` for a zero length prefix, a
    FIN before the whole message, or data after the message.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, end_stream: bool) -> bytes | None:
        self._buffer += data
        buf = self._buffer
        if len(buf) >= 2:
            length = (buf[0] << 8) | buf[1]
            if length == 0:
                raise DoqProtocolError("zero-length DNS message")
            if len(buf) > length + 2:
                raise DoqProtocolError("more than one DNS message on a stream")
        if not end_stream:
            return None
        if len(buf) < 2 or len(buf) < ((buf[0] << 8) | buf[1]) + 2:
            raise DoqProtocolError("stream ended before the whole DNS message")
        return bytes(buf[2:])

    @property
    def message_complete(self) -> bool:
        """The full message is in, even if FIN has not arrived yet."""
        buf = self._buffer
        return len(buf) >= 2 and len(buf) == ((buf[0] << 8) | buf[1]) + 2


def check_doq_query(question: wire.Question) -> None:
    """RFC 9250 §4.2.1 and §5.5.2: ID 0 and no edns-tcp-keepalive, or a protocol error."""
    if question.id != 0:
        raise DoqProtocolError(f"message ID {question.id}, must be 0")
    edns = question.edns
    if edns is not None and any(code == wire.OPTION_KEEPALIVE for code, _ in edns.options):
        raise DoqProtocolError("edns-tcp-keepalive option on a DoQ query")


def check_doq_response(message: bytes) -> None:
    """RFC 9250 §4.2.1 and §4.3.3: a response with a non-zero Message ID is a protocol error."""
    if message[:2] != b"\0\0":
        message_id = int.from_bytes(message[:2], "big")
        raise DoqProtocolError(f"response with message ID {message_id}, must be 0")


def is_client_bidi(stream_id: int) -> bool:
    return stream_id & 0x3 == 0
