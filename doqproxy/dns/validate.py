"""Classify an incoming query: forward it, answer it with an error, or drop it.

The rules follow RFC 1035, RFC 6891 and RFC 5936 and are applied in this order:

=====================================================  ==========================
input                                                  outcome
=====================================================  ==========================
fewer than 12 octets                                   drop (TCP: close)
QR=1                                                   drop
opcode other than QUERY                                NOTIMP
QDCOUNT != 1                                           FORMERR
a broken body (labels, compression, truncation)        FORMERR
more than one OPT, or OPT outside additional           FORMERR
EDNS version != 0                                      BADVERS
meta QTYPE (OPT, TSIG, TKEY, 128-254 except ANY)       FORMERR
AXFR or IXFR                                           REFUSED
records: ANCOUNT != 0 (but NOTIFY), NSCOUNT != 0, or   FORMERR
an additional record other than one OPT (e.g. TSIG)
=====================================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass

from doqproxy.dns import wire
from doqproxy.dns.wire import Question


@dataclass(slots=True, frozen=True)
class Rejected:
    """The query is not forwarded. ``reply`` is sent back, or nothing when ``None``."""

    reason: str
    reply: bytes | None


def is_meta_qtype(qtype: int) -> bool:
    """OPT, and the 128-255 range except ANY: types that are not real questions."""
    return qtype == wire.TYPE_OPT or (128 <= qtype <= 254 and qtype not in _QUESTION_META)


# AXFR, IXFR and the obsolete MAILB/MAILA are real questions; TSIG and TKEY are not.
_QUESTION_META = frozenset({wire.TYPE_IXFR, wire.TYPE_AXFR, 253, 254})


def _carried_records(data: bytes, question: Question) -> str:
    """Why a query carrying records must not be forwarded, or ``""``.

    A stub query holds a question and at most its OPT. Anything else (another
    client's TSIG, an answer or authority section) would reach the upstream byte
    for byte, so it is refused as Unbound's worker_check_request does. NOTIFY
    legitimately carries the zone's SOA in its answer section (RFC 1996).
    """
    an = (data[6] << 8) | data[7]
    ns = (data[8] << 8) | data[9]
    ar = (data[10] << 8) | data[11]
    if an and question.opcode != wire.OPCODE_NOTIFY:
        return f"query carries {an} answer record(s)"
    if ns:
        return f"query carries {ns} authority record(s)"
    if ar > (1 if question.edns is not None else 0):
        return "query carries additional records besides its OPT"
    return ""


def classify(
    data: bytes, opcodes: frozenset[int] = frozenset({wire.OPCODE_QUERY})
) -> Question | Rejected:
    """Return the parsed question if the query may be answered, else a :class:`Rejected`."""
    if len(data) < wire.HEADER_LEN:
        return Rejected("shorter than a DNS header", None)
    if data[2] & 0x80:
        return Rejected("QR bit set in a query", None)
    opcode = (data[2] >> 3) & 0x0F
    if opcode not in opcodes:
        return Rejected(
            f"opcode {opcode} not implemented", wire.header_only_reply(data, wire.RCODE_NOTIMP)
        )
    try:
        question = wire.parse_question(data)
    except wire.WireError as exc:
        return Rejected(f"malformed: {exc}", wire.header_only_reply(data, wire.RCODE_FORMERR))
    if question.edns is not None and question.edns.version != 0:
        return Rejected(
            f"EDNS version {question.edns.version}", wire.error_reply(question, wire.RCODE_BADVERS)
        )
    if is_meta_qtype(question.qtype):
        return Rejected(
            f"meta QTYPE {question.qtype}", wire.error_reply(question, wire.RCODE_FORMERR)
        )
    if question.qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR):
        return Rejected("zone transfer", wire.error_reply(question, wire.RCODE_REFUSED))
    carried = _carried_records(data, question)
    if carried:
        return Rejected(carried, wire.error_reply(question, wire.RCODE_FORMERR))
    return question
