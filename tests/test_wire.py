"""Unit tests for doqproxy.dns.wire and doqproxy.dns.validate (no sockets)."""

from __future__ import annotations

import dns.edns
import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from doqproxy.dns import validate, wire


def make(name: str = "Example.COM.", rdtype: str = "A", **kw: object) -> bytes:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    query.id = 0xBEEF
    return query.to_wire()


def test_parse_question_plain() -> None:
    q = wire.parse_question(make())
    assert q.id == 0xBEEF
    assert q.qname == b"\x07Example\x03COM\x00"
    assert q.key == (b"\x07example\x03com\x00", 1, 1)
    assert q.edns is None
    assert q.question_end == 12 + len(q.qname) + 4


def test_parse_question_edns() -> None:
    cookie = dns.edns.GenericOption(10, b"12345678")
    q = wire.parse_question(make(use_edns=0, payload=4096, want_dnssec=True, options=[cookie]))
    assert q.edns is not None
    assert (q.edns.payload, q.edns.version, q.edns.do) == (4096, 0, True)
    assert q.edns.options == ((10, b"12345678"),)


def test_read_name_follows_backward_pointers() -> None:
    data = b"\x00" * 12 + b"\x01a\x00" + b"\x01b\xc0\x0c"
    assert wire.read_name(data, 15) == (b"\x01b\x01a\x00", 19)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 12 + b"\xc0\x0c",  # points at itself
        b"\x00" * 12 + b"\xc0\x0e\x00",  # points forward
        b"\x00" * 12 + b"\x01a",  # runs off the end
        b"\x00" * 12 + b"\x80",  # reserved label type
        b"\x00" * 12
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x00",
    ],
)
def test_read_name_rejects(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.read_name(data, 12)


def test_id_helpers() -> None:
    data = make()
    assert wire.get_id(data) == 0xBEEF
    assert wire.get_id(wire.set_id(data, 7)) == 7
    assert wire.set_id(data, 7)[2:] == data[2:]


def test_udp_payload_limit() -> None:
    assert wire.udp_payload_limit(wire.parse_question(make())) == 512
    assert wire.udp_payload_limit(wire.parse_question(make(use_edns=0, payload=100))) == 512
    big = wire.parse_question(make(use_edns=0, payload=1400))
    assert wire.udp_payload_limit(big) == 1232  # --max-udp-size's default caps it
    assert wire.udp_payload_limit(big, 4096) == 1400


def test_error_reply_badvers_uses_extended_rcode() -> None:
    data = bytearray(make(use_edns=0))
    q = wire.parse_question(bytes(data))
    reply = dns.message.from_wire(wire.error_reply(q, wire.RCODE_BADVERS))
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.id == 0xBEEF and reply.edns == 0


def test_error_reply_with_ede() -> None:
    q = wire.parse_question(make(use_edns=0))
    reply = dns.message.from_wire(wire.error_reply(q, wire.RCODE_SERVFAIL, ede=(23, "boom")))
    (option,) = reply.options
    assert isinstance(option, dns.edns.EDEOption)
    assert (option.code, option.text) == (23, "boom")


def test_replace_opt_adds_and_removes() -> None:
    plain = make()
    q = wire.parse_question(plain)
    added = wire.replace_opt(plain, None, wire.encode_opt(1232))
    assert dns.message.from_wire(added).payload == 1232
    q2 = wire.parse_question(added)
    assert wire.replace_opt(added, q2.edns, None) == plain
    assert q.edns is None


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"\x00\x01", None),
        (wire.set_id(make(), 1)[:2] + b"\x81\x00" + make()[4:], None),
        (make()[:2] + b"\x28\x00" + make()[4:], wire.RCODE_NOTIMP),
        (make("a.", "AXFR"), wire.RCODE_REFUSED),
        (make("a.", "TSIG"), wire.RCODE_FORMERR),
        (make("a.", "ANY"), "ok"),
        (make("a.", "MAILB"), "ok"),
    ],
)
def test_classify(data: bytes, expect: object) -> None:
    verdict = validate.classify(data)
    if expect == "ok":
        assert isinstance(verdict, wire.Question)
    elif expect is None:
        assert isinstance(verdict, validate.Rejected) and verdict.reply is None
    else:
        assert isinstance(verdict, validate.Rejected) and verdict.reply is not None
        assert verdict.reply[3] & 0x0F == expect
        assert verdict.reply[:2] == data[:2]


def test_classify_allows_notify_when_asked() -> None:
    data = make()[:2] + b"\x20\x00" + make()[4:]
    assert isinstance(validate.classify(data, frozenset({0, 4})), wire.Question)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_classify_never_crashes(data: bytes) -> None:
    verdict = validate.classify(data)
    if isinstance(verdict, validate.Rejected) and verdict.reply is not None:
        assert verdict.reply[:2] == data[:2]
        assert verdict.reply[2] & 0x80  # QR


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 60))
def test_fuzz_mutated_queries(noise: bytes, offset: int) -> None:
    base = bytearray(make(use_edns=0))
    offset = min(offset, len(base) - 1)
    base[offset : offset + len(noise)] = noise
    verdict = validate.classify(bytes(base))
    assert isinstance(verdict, (wire.Question, validate.Rejected))


def test_scan_question_and_name_text() -> None:
    data = make("Example.COM.", "AAAA")
    found = wire.scan_question(data)
    assert found == (12 + len(b"\x07Example\x03COM\x00"), 28)
    assert wire.name_text(data[12 : found[0]]) == "Example.COM."
    assert wire.name_text(b"\x00") == "."
    assert wire.scan_question(data[:20]) is None
    assert wire.scan_question(b"\x00" * 12 + b"\xc0\x0c\x00\x01\x00\x01") is None
