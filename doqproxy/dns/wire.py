"""DNS wire-format helpers that work on bytes, without building dnspython messages.

Everything here is pure: it takes ``bytes`` and returns ``bytes`` or small value
objects. The hot paths (a cache hit, a forwarded query) use these functions
instead of ``dns.message``, which costs tens of microseconds per parse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_LEN = 12
MIN_UDP_PAYLOAD = 512
DEFAULT_MAX_UDP = 1232
"""The largest UDP reply we send and the payload size we advertise: the DNS Flag Day
2020 value, as Unbound's ``max-udp-size`` and dnsmasq's ``edns-packet-max``."""
MAX_MESSAGE = 65535

# Header flag bits (second 16-bit word).
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

OPCODE_QUERY = 0
OPCODE_NOTIFY = 4

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16

TYPE_SOA = 6
TYPE_OPT = 41
TYPE_TKEY = 249
TYPE_TSIG = 250
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255

EDNS_DO = 0x8000
OPTION_ECS = 8
OPTION_COOKIE = 10
OPTION_KEEPALIVE = 11
OPTION_PADDING = 12
OPTION_EDE = 15

_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_HEADER = struct.Struct("!HHHHHH")


class WireError(ValueError):
    """The message cannot be parsed: bad labels, a compression loop, a pointer past the end."""


class FormatError(WireError):
    """Parsable, but not a well-formed DNS message (answer FORMERR)."""


# Edns and Question are built twice on every cache miss (query and answer), so they
# are plain slotted dataclasses: a frozen one's __init__ costs seven times as much
# (object.__setattr__ per field). Nothing mutates them; treat them as read-only.
@dataclass(slots=True)
class Edns:
    """The OPT pseudo-record of a message (read-only by convention)."""

    payload: int
    """The requestor's UDP payload size, as sent (not clamped)."""
    ext_rcode: int
    """The upper eight bits of the extended RCODE."""
    version: int
    flags: int
    """The 16-bit EDNS flags word; bit 0x8000 is DO."""
    options: tuple[tuple[int, bytes], ...]
    start: int
    """Offset of the OPT record's owner name."""
    end: int
    """Offset just past the OPT record."""

    @property
    def do(self) -> bool:
        return bool(self.flags & EDNS_DO)


@dataclass(slots=True)
class Question:
    """The parsed header and question of a message, plus its OPT record if any
    (read-only by convention)."""

    id: int
    flags: int
    qname: bytes
    """The question name in uncompressed wire form, as spelled by the sender."""
    qtype: int
    qclass: int
    question_end: int
    """Offset just past the question section."""
    edns: Edns | None
    counts: tuple[int, int, int, int]

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def key(self) -> tuple[bytes, int, int]:
        """Case-insensitive identity of the question."""
        return (self.qname.lower(), self.qtype, self.qclass)


def read_name(data: bytes, offset: int) -> tuple[bytes, int]:
    """Read a possibly compressed domain name.

    Returns the name in uncompressed wire form and the offset just past the name
    as it is stored at ``offset``. Raises :class:`WireError` on a bad label type,
    a name over 255 octets, a pointer past the end, or a pointer that does not
    point strictly backwards (which is what rules out loops).
    """
    # Fast path: an uncompressed name (a query's, and nearly every answer's
    # question) is one slice. Anything else, errors included, takes the full walk.
    pos = offset
    limit = len(data)
    while pos < limit:
        length = data[pos]
        if length == 0:
            if pos - offset < 255:
                return data[offset : pos + 1], pos + 1
            break
        if length & 0xC0:
            break
        pos += 1 + length
    return _read_name_walk(data, offset)


def _read_name_walk(data: bytes, offset: int) -> tuple[bytes, int]:
    parts: list[bytes] = []
    total = 0
    end = -1
    pos = offset
    limit = len(data)
    while True:
        if pos >= limit:
            raise WireError("name runs past the end of the message")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= limit:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end < 0:
                end = pos + 2
            if target >= pos:
                raise WireError("compression pointer does not point backwards")
            pos = target
            continue
        if length & 0xC0:
            raise WireError(f"unsupported label type 0x{length & 0xC0:02x}")
        total += length + 1
        if total > 255:
            raise WireError("name longer than 255 octets")
        if length == 0:
            parts.append(b"\x00")
            if end < 0:
                end = pos + 1
            return b"".join(parts), end
        if pos + 1 + length > limit:
            raise WireError("label runs past the end of the message")
        parts.append(data[pos : pos + 1 + length])
        pos += 1 + length


def skip_name(data: bytes, offset: int) -> int:
    """Return the offset just past the name stored at ``offset`` (pointers not followed)."""
    pos = offset
    limit = len(data)
    while pos < limit:
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > limit:
                break
            return pos + 2
        if length & 0xC0:
            raise WireError(f"unsupported label type 0x{length & 0xC0:02x}")
        if length == 0:
            return pos + 1
        pos += 1 + length
    raise WireError("name runs past the end of the message")


def parse_question(data: bytes) -> Question:
    """Parse header, question and the OPT record, walking every record once.

    Structural problems raise :class:`WireError`; RR-level policy (duplicate OPT,
    OPT outside the additional section) raises :class:`FormatError`. The caller
    decides what an unexpected value means.
    """
    if len(data) < HEADER_LEN:
        raise WireError("message shorter than a DNS header")
    msg_id, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if qd != 1:
        raise FormatError(f"QDCOUNT is {qd}, expected 1")
    qname, pos = read_name(data, HEADER_LEN)
    if pos + 4 > len(data):
        raise WireError("question runs past the end of the message")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    question_end = pos + 4
    edns = _walk_records(data, question_end, an, ns, ar)
    return Question(msg_id, flags, qname, qtype, qclass, question_end, edns, (qd, an, ns, ar))


def _walk_records(data: bytes, pos: int, an: int, ns: int, ar: int) -> Edns | None:
    edns: Edns | None = None
    limit = len(data)
    for index in range(an + ns + ar):
        start = pos
        pos = skip_name(data, pos)
        if pos + 10 > limit:
            raise WireError("resource record runs past the end of the message")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        pos += 10
        if pos + rdlen > limit:
            raise WireError("RDATA runs past the end of the message")
        if rtype == TYPE_OPT:
            if index < an + ns:
                raise FormatError("OPT record outside the additional section")
            if edns is not None:
                raise FormatError("more than one OPT record")
            if data[start] != 0:
                raise FormatError("OPT owner name is not the root")
            edns = Edns(
                payload=rclass,
                ext_rcode=ttl >> 24,
                version=(ttl >> 16) & 0xFF,
                flags=ttl & 0xFFFF,
                options=_parse_options(data, pos, pos + rdlen),
                start=start,
                end=pos + rdlen,
            )
        pos += rdlen
    if pos != limit:
        raise WireError(f"{limit - pos} trailing octets after the last record")
    return edns


def _parse_options(data: bytes, pos: int, end: int) -> tuple[tuple[int, bytes], ...]:
    options = []
    while pos < end:
        if pos + 4 > end:
            raise FormatError("truncated EDNS option")
        code, length = struct.unpack_from("!HH", data, pos)
        pos += 4
        if pos + length > end:
            raise FormatError("EDNS option runs past the OPT record")
        options.append((code, data[pos : pos + length]))
        pos += length
    return tuple(options)


# --- small field accessors -------------------------------------------------


def scan_question(data: bytes) -> tuple[int, int] | None:
    """(offset just past the question name, QTYPE) of a raw message whose first name
    is uncompressed, without decoding anything; ``None`` if it is not readable."""
    pos, end = HEADER_LEN, len(data)
    while pos < end:
        length = data[pos]
        if length == 0:
            if pos + 3 > end:
                return None
            return pos + 1, (data[pos + 1] << 8) | data[pos + 2]
        if length & 0xC0:
            return None
        pos += 1 + length
    return None


def name_text(name: bytes) -> str:
    """An uncompressed wire-form name as dotted text, for logs (no escaping)."""
    labels = []
    pos = 0
    while pos < len(name) and name[pos]:
        labels.append(name[pos + 1 : pos + 1 + name[pos]].decode("ascii", "backslashreplace"))
        pos += 1 + name[pos]
    return ".".join(labels) + "."


def get_id(data: bytes) -> int:
    return (data[0] << 8) | data[1]


def set_id(data: bytes, msg_id: int) -> bytes:
    """Return ``data`` with its message ID replaced."""
    return _U16.pack(msg_id) + data[2:]


def get_rcode(data: bytes) -> int:
    return data[3] & RCODE_MASK


def is_truncated(data: bytes) -> bool:
    return bool(data[2] & (FLAG_TC >> 8))


def udp_payload_limit(question: Question, cap: int = DEFAULT_MAX_UDP) -> int:
    """The largest UDP response we send this client: what it accepts (RFC 6891
    §6.2.5), but never more than ``cap`` (``--max-udp-size``), so that a large
    EDNS buffer cannot turn us into an amplifier."""
    if question.edns is None:
        return MIN_UDP_PAYLOAD
    return min(max(question.edns.payload, MIN_UDP_PAYLOAD), max(cap, MIN_UDP_PAYLOAD))


# --- building OPT records and messages --------------------------------------


def encode_opt(
    payload: int,
    options: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]] = (),
    *,
    flags: int = 0,
    ext_rcode: int = 0,
    version: int = 0,
) -> bytes:
    """Encode an OPT pseudo-record."""
    rdata = b"".join(_U16.pack(code) + _U16.pack(len(value)) + value for code, value in options)
    ttl = (ext_rcode << 24) | (version << 16) | flags
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, payload, ttl, len(rdata)) + rdata


def padding_option(unpadded_len: int, block: int) -> tuple[int, bytes]:
    """A Padding option (RFC 7830) that brings a message of ``unpadded_len`` octets
    (measured without the option) to a multiple of ``block`` octets (RFC 8467)."""
    with_header = unpadded_len + 4
    pad = (-with_header) % block
    return (OPTION_PADDING, b"\x00" * pad)


def replace_opt(data: bytes, edns: Edns | None, opt: bytes | None) -> bytes:
    """Swap the message's OPT record for ``opt`` (``None`` removes it).

    A message without OPT gets ``opt`` appended at the end of the additional
    section. ARCOUNT is adjusted.
    """
    ar = (data[10] << 8) | data[11]
    if edns is None:
        if opt is None:
            return data
        return data[:10] + _U16.pack(ar + 1) + data[HEADER_LEN:] + opt
    if opt is None:
        return data[:10] + _U16.pack(ar - 1) + data[HEADER_LEN : edns.start] + data[edns.end :]
    return data[: edns.start] + opt + data[edns.end :]


def response_header(
    question: Question, rcode: int, *, extra_flags: int = 0, counts: tuple[int, int, int, int]
) -> bytes:
    """Header of a reply to ``question``: same ID, opcode, RD and CD; QR and RA set."""
    flags = (
        FLAG_QR
        | FLAG_RA
        | (question.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD))
        | extra_flags
        | (rcode & RCODE_MASK)
    )
    return _HEADER.pack(question.id, flags, *counts)


def error_reply(
    question: Question,
    rcode: int,
    *,
    payload: int = 1232,
    ede: tuple[int, str] | None = None,
) -> bytes:
    """A reply with the question echoed, no records, and OPT if the query had one.

    ``rcode`` may be an extended RCODE (BADVERS); ``ede`` adds an Extended DNS Error
    (RFC 8914) when the query used EDNS.
    """
    opt = b""
    if question.edns is not None:
        options = []
        if ede is not None:
            options.append((OPTION_EDE, _U16.pack(ede[0]) + ede[1].encode()))
        opt = encode_opt(
            payload, options, flags=question.edns.flags & EDNS_DO, ext_rcode=rcode >> 4
        )
    header = response_header(question, rcode, counts=(1, 0, 0, 1 if opt else 0))
    return header + question.qname + struct.pack("!HH", question.qtype, question.qclass) + opt


def header_only_reply(data: bytes, rcode: int) -> bytes:
    """A reply for a query whose question could not be read: header only."""
    msg_id, flags = struct.unpack_from("!HH", data)
    flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | (rcode & RCODE_MASK)
    return _HEADER.pack(msg_id, flags, 0, 0, 0, 0)


def truncated_reply(question: Question, response: bytes, edns_opt: bytes | None) -> bytes:
    """Header, question and OPT only, with TC=1 and the response's RCODE and AA."""
    flags = (response[2] << 8) | response[3]
    header = _HEADER.pack(
        question.id,
        (flags & ~RCODE_MASK & 0xFFFF) | FLAG_TC | (flags & RCODE_MASK),
        1,
        0,
        0,
        1 if edns_opt else 0,
    )
    tail = struct.pack("!HH", question.qtype, question.qclass)
    return header + question.qname + tail + (edns_opt or b"")
