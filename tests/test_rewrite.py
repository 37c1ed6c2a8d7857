"""Unit tests for doqproxy.dns.rewrite and doqproxy.doq.framing (no sockets)."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doqproxy.dns import rewrite, wire
from doqproxy.doq import framing


def query(name: str = "a.test.", rdtype: str = "A", **kw: object) -> tuple[bytes, wire.Question]:
    message = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    message.id = 4321
    data = message.to_wire()
    return data, wire.parse_question(data)


def answer_for(data: bytes, *, records: int = 1, pad: bool = False) -> bytes:
    q = dns.message.from_wire(data)
    response = dns.message.make_response(q)
    response.id = 0
    for i in range(records):
        response.answer.append(
            dns.rrset.from_text(q.question[0].name, 60, "IN", "TXT", f'"{i:04d}{"x" * 100}"')
        )
    if pad and response.edns >= 0:
        response.use_edns(0, options=[dns.edns.GenericOption(12, b"\x00" * 30)])
    return response.to_wire(max_size=65535)


@settings(max_examples=200, deadline=None)
@given(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=60),
    st.booleans(),
    st.sampled_from([None, 128, 468]),
)
def test_upstream_query_padding_and_id(label: str, edns: bool, block: int | None) -> None:
    kw = {"use_edns": 0} if edns else {}
    data, q = query(f"{label}.test.", **kw)
    out = rewrite.upstream_query(data, q, pad_block=block)
    assert out[:2] == b"\x00\x00"
    parsed = dns.message.from_wire(out)
    assert parsed.question == dns.message.from_wire(data).question
    if block:
        assert len(out) % block == 0
    elif not edns:
        assert out[2:] == data[2:]


def test_upstream_query_strips_hop_by_hop_options_keeps_others() -> None:
    keepalive = dns.edns.GenericOption(11, b"")
    cookie = dns.edns.GenericOption(10, b"abcdefgh")
    ecs = dns.edns.ECSOption("203.0.113.0", 24)
    nsid = dns.edns.GenericOption(3, b"")
    data, q = query(use_edns=0, options=[keepalive, cookie, ecs, nsid])
    for block in (None, 128):
        out = dns.message.from_wire(rewrite.upstream_query(data, q, pad_block=block))
        codes = [o.otype for o in out.options]
        assert 11 not in codes and 10 not in codes and 8 not in codes
        assert 3 in codes


def test_client_reply_restores_id_case_and_strips_padding() -> None:
    data, q = query("MiXeD.TeSt.", use_edns=0, payload=4096)
    upstream_answer = answer_for(rewrite.upstream_query(data, q, pad_block=128), pad=True)
    parsed = rewrite.check_response(upstream_answer, q)
    reply = rewrite.client_reply(upstream_answer, parsed, q, udp=True)
    message = dns.message.from_wire(reply)
    assert message.id == 4321
    assert message.question[0].name.to_text() == "MiXeD.TeSt."
    assert message.payload == rewrite.OUR_UDP_PAYLOAD
    assert not [o for o in message.options if o.otype == 12]


def test_client_reply_removes_opt_the_client_did_not_send() -> None:
    data, q = query()
    upstream_answer = answer_for(rewrite.upstream_query(data, q, pad_block=128))
    parsed = rewrite.check_response(upstream_answer, q)
    message = dns.message.from_wire(rewrite.client_reply(upstream_answer, parsed, q, udp=True))
    assert message.edns == -1 and len(message.answer) == 1


def test_client_reply_truncates_only_over_udp() -> None:
    data, q = query(rdtype="TXT", use_edns=0, payload=1232)
    big = answer_for(data, records=20)
    parsed = rewrite.check_response(big, q)
    udp_reply = dns.message.from_wire(rewrite.client_reply(big, parsed, q, udp=True))
    assert udp_reply.flags & dns.flags.TC and not udp_reply.answer and udp_reply.edns == 0
    tcp_reply = dns.message.from_wire(rewrite.client_reply(big, parsed, q, udp=False))
    assert len(tcp_reply.answer[0]) == 20


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:2] + bytes([b[2] & 0x7F]) + b[3:],  # QR=0
        lambda b: b.replace(b"\x01a\x04test", b"\x01b\x04test", 1),  # other name
        lambda b: b[:-3],  # truncated
    ],
)
def test_check_response_rejects(mutate) -> None:  # type: ignore[no-untyped-def]
    data, q = query()
    with pytest.raises(rewrite.ResponseMismatch):
        rewrite.check_response(mutate(answer_for(data)), q)


def test_check_response_is_case_insensitive() -> None:
    _, q = query("A.TEST.")
    lower_data, _ = query("a.test.")
    rewrite.check_response(answer_for(lower_data), q)


def test_pad_response_to_468() -> None:
    data, _ = query(use_edns=0)
    padded = rewrite.pad_response(answer_for(data))
    assert len(padded) % 468 == 0
    assert dns.message.from_wire(padded).answer


def test_stream_reader_reassembles_any_split() -> None:
    message = b"\x00\x00" + b"z" * 100
    framed = framing.frame(message)
    for cut in range(1, len(framed)):
        reader = framing.StreamReader()
        assert reader.feed(framed[:cut], False) is None
        assert reader.feed(framed[cut:], True) == message


@pytest.mark.parametrize(
    ("chunks", "error"),
    [
        ([(b"\x00\x00", False)], "zero-length"),
        ([(b"\x00\x05abc", True)], "ended before"),
        ([(b"\x00", True)], "ended before"),
        ([(b"\x00\x02ab\x00\x02cd", True)], "more than one"),
        ([(b"\x00\x02ab", False), (b"x", True)], "more than one"),
    ],
)
def test_stream_reader_protocol_errors(chunks: list[tuple[bytes, bool]], error: str) -> None:
    reader = framing.StreamReader()
    with pytest.raises(framing.DoqProtocolError, match=error):
        for data, end in chunks:
            reader.feed(data, end)


def test_check_doq_query() -> None:
    data, q = query()
    with pytest.raises(framing.DoqProtocolError, match="ID"):
        framing.check_doq_query(q)
    zero = wire.parse_question(b"\x00\x00" + data[2:])
    framing.check_doq_query(zero)
    ka, _ = query(use_edns=0, options=[dns.edns.GenericOption(11, b"")])
    with pytest.raises(framing.DoqProtocolError, match="keepalive"):
        framing.check_doq_query(wire.parse_question(b"\x00\x00" + ka[2:]))


def test_frame_limits() -> None:
    with pytest.raises(ValueError):
        framing.frame(b"")
    with pytest.raises(ValueError):
        framing.frame(b"x" * 65536)


def test_client_reply_leaves_an_opt_that_is_not_last_alone() -> None:
    data, q = query(use_edns=0)
    response = dns.message.from_wire(answer_for(data))
    tail = b"\x01a\x04test\x00\x00\x10\x00\x01\x00\x00\x00\x3c\x00\x02\x01x"  # TXT after OPT
    raw = bytearray(response.to_wire())
    raw[11] += 1  # ARCOUNT
    raw += tail
    parsed = rewrite.check_response(bytes(raw), q)
    reply = rewrite.client_reply(bytes(raw), parsed, q, udp=False)
    assert reply[2:] == bytes(raw)[2:]
    assert dns.message.from_wire(reply).id == 4321


def test_pad_response_leaves_a_header_only_reply_alone() -> None:
    header_only = b"\x00\x00\x80\x04" + b"\x00" * 8  # NOTIMP, no question
    assert rewrite.pad_response(header_only) == header_only
