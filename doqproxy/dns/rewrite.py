"""Rewrite messages on their way up to an upstream and back to a client.

Pure functions over wire bytes. On the way up a query gets ID 0, loses any
edns-tcp-keepalive option (RFC 9250 §5.5.2), any padding, COOKIE and ECS option it
carried, and is
padded afresh to a block size (RFC 8467). On the way back the answer gets the
client's ID, the client's spelling of the question name, an OPT record only if
the client sent one (carrying our payload size, without padding), and is
truncated to the client's UDP limit when it travels over UDP.
"""

from __future__ import annotations

import struct

from doqproxy.dns import wire
from doqproxy.dns.wire import Edns, Question

QUERY_PADDING_BLOCK = 128
"""RFC 8467 §4.1: clients pad queries to a multiple of 128 octets."""
RESPONSE_PADDING_BLOCK = 468
"""RFC 8467 §4.1: servers pad responses to a multiple of 468 octets."""
OUR_UDP_PAYLOAD = wire.DEFAULT_MAX_UDP
"""The payload size we advertise by default (DNS flag day 2020)."""

_DROP_UPSTREAM = frozenset(
    {wire.OPTION_KEEPALIVE, wire.OPTION_PADDING, wire.OPTION_COOKIE, wire.OPTION_ECS}
)
"""Hop-by-hop options: keepalive and padding belong to one transport, a cookie to one
client-server pair (RFC 7873), and a client subnet must neither leak upstream nor end
up in an answer shared through the cache with other clients."""


def upstream_query(data: bytes, question: Question, *, pad_block: int | None) -> bytes:
    """The query as sent upstream: ID 0, keepalive and old padding removed, padded.

    A query without EDNS gets an OPT record only when padding is wanted; the reply
    path removes it again, because the client did not ask for EDNS.
    """
    body = b"\x00\x00" + data[2:]
    edns = question.edns
    if edns is None:
        if not pad_block:
            return body
        options: list[tuple[int, bytes]] = []
        base = len(body) + 11
        payload, flags = OUR_UDP_PAYLOAD, 0
    else:
        options = [opt for opt in edns.options if opt[0] not in _DROP_UPSTREAM]
        if not pad_block and len(options) == len(edns.options):
            return body
        payload, flags = edns.payload, edns.flags
        base = len(body) - (edns.end - edns.start) + 11 + sum(4 + len(v) for _, v in options)
    if pad_block:
        options.append(wire.padding_option(base, pad_block))
    opt = wire.encode_opt(payload, options, flags=flags, version=0)
    return wire.replace_opt(body, edns, opt)


def response_opt(
    client_edns: Edns | None, response_edns: Edns | None, payload: int = OUR_UDP_PAYLOAD
) -> bytes | None:
    """The OPT record a client should see in the reply, or ``None`` for none.

    It carries our payload size, the response's extended RCODE and DO bit, and the
    response's options minus padding and keepalive (both hop-by-hop).
    """
    if client_edns is None:
        return None
    if response_edns is None:
        return wire.encode_opt(payload)
    options = [opt for opt in response_edns.options if opt[0] not in _DROP_UPSTREAM]
    return wire.encode_opt(
        payload,
        options,
        flags=response_edns.flags & wire.EDNS_DO,
        ext_rcode=response_edns.ext_rcode,
    )


class ResponseMismatch(ValueError):
    """The upstream's answer is not a reply to the question that was asked."""


def check_response(response: bytes, question: Question) -> Question:
    """Parse an upstream answer and make sure it answers ``question``."""
    try:
        parsed = wire.parse_question(response)
    except wire.WireError as exc:
        raise ResponseMismatch(f"malformed answer: {exc}") from None
    if not parsed.flags & wire.FLAG_QR:
        raise ResponseMismatch("answer has QR=0")
    if parsed.key != question.key:
        raise ResponseMismatch("answer is for a different question")
    return parsed


def client_reply(
    response: bytes,
    parsed: Question,
    question: Question,
    *,
    udp: bool,
    max_udp: int = OUR_UDP_PAYLOAD,
) -> bytes:
    """Shape a checked upstream answer for the client that sent ``question``.

    ``parsed`` is the result of :func:`check_response` on ``response``. Over UDP
    the reply is truncated (TC=1) beyond the client's limit or ``max_udp``,
    whichever is smaller; ``max_udp`` is also the payload size our OPT advertises.
    """
    opt = response_opt(question.edns, parsed.edns, max_udp)
    reply = response
    if parsed.edns is not None and parsed.edns.end != len(response):
        # Records follow the OPT (a TSIG must be last). Resizing the OPT would move
        # names that their compression pointers refer to, so it is passed as is.
        opt = response[parsed.edns.start : parsed.edns.end]
    elif parsed.edns is not None or opt is not None:
        reply = wire.replace_opt(reply, parsed.edns, opt)
    # Client's ID and, when the answer's question is stored uncompressed (as it
    # always is in practice), the client's spelling of the name (0x20 mixed case).
    name_end = wire.HEADER_LEN + len(question.qname)
    if parsed.question_end - 4 == name_end:
        reply = struct.pack("!H", question.id) + reply[2:12] + question.qname + reply[name_end:]
    else:
        reply = struct.pack("!H", question.id) + reply[2:]
    if udp and len(reply) > wire.udp_payload_limit(question, max_udp):
        return wire.truncated_reply(question, reply, opt)
    return reply


def pad_response(response: bytes, block: int = RESPONSE_PADDING_BLOCK) -> bytes:
    """Pad a response that has an OPT record to a multiple of ``block`` octets.

    A reply that cannot be parsed as one (a header-only NOTIMP or FORMERR) is
    returned as it is.
    """
    try:
        parsed = wire.parse_question(response)
    except wire.WireError:
        return response
    edns = parsed.edns
    if edns is None:
        return response
    options = [opt for opt in edns.options if opt[0] != wire.OPTION_PADDING]
    base = len(response) - (edns.end - edns.start) + 11 + sum(4 + len(v) for _, v in options)
    options.append(wire.padding_option(base, block))
    opt = wire.encode_opt(
        edns.payload, options, flags=edns.flags, ext_rcode=edns.ext_rcode, version=edns.version
    )
    return wire.replace_opt(response, edns, opt)
