"""The pure parts behind ``doqproxy serve``: zone answers, query admission, ticket store."""

from __future__ import annotations

import datetime
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.update
import pytest
from aioquic.tls import CipherSuite, SessionTicket
from hypothesis import given
from hypothesis import strategies as st

from doqproxy.dns import wire
from doqproxy.doq import framing, server_rules
from doqproxy.frontend.ticket_store import TicketStore
from doqproxy.resolver import Resolver
from doqproxy.upstream.zone import ZoneBackend, ZoneError

from .serve_helpers import ZONE_TEXT, query


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ZoneBackend:
    path = tmp_path_factory.mktemp("units") / "example.test.zone"
    path.write_text(ZONE_TEXT)
    return ZoneBackend.from_file(path)


def ask(
    backend: ZoneBackend, name: str, rdtype: str = "A", **kwargs: object
) -> dns.message.Message:
    return dns.message.from_wire(backend.answer(query(name, rdtype, **kwargs).to_wire()))


def types(section: list[dns.rrset.RRset]) -> list[str]:
    return [dns.rdatatype.to_text(rrset.rdtype) for rrset in section]


# --- zone backend ------------------------------------------------------------------


def test_cname_inside_the_zone_is_followed(backend: ZoneBackend) -> None:
    answer = ask(backend, "alias.example.test", "AAAA")
    assert types(answer.answer) == ["CNAME", "AAAA"]
    assert answer.flags & dns.flags.AA
    # Asking for the CNAME itself does not follow it.
    assert types(ask(backend, "alias.example.test", "CNAME").answer) == ["CNAME"]


def test_cname_leaving_the_zone_stops_there(backend: ZoneBackend) -> None:
    answer = ask(backend, "out.example.test", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert types(answer.answer) == ["CNAME"]
    assert answer.authority == []


def test_delegation_gives_a_referral_with_glue(backend: ZoneBackend) -> None:
    answer = ask(backend, "deep.sub.example.test", "A")
    assert not answer.flags & dns.flags.AA
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer == []
    assert types(answer.authority) == ["NS"]
    assert answer.authority[0].name.to_text() == "sub.example.test."
    assert [rd.to_text() for rrset in answer.additional for rd in rrset] == ["192.0.2.54"]
    # DS lives on the parent side of the cut: answered authoritatively (NODATA here).
    ds = ask(backend, "sub.example.test", "DS")
    assert ds.flags & dns.flags.AA
    assert types(ds.authority) == ["SOA"]


def test_mx_answer_carries_glue_and_any_returns_everything(backend: ZoneBackend) -> None:
    mx = ask(backend, "example.test", "MX")
    assert types(mx.answer) == ["MX"]
    assert [rrset.name.to_text() for rrset in mx.additional] == ["mail.example.test."]
    assert sorted(types(ask(backend, "www.example.test", "ANY").answer)) == ["A", "AAAA"]


def test_wildcard_does_not_cover_existing_names(backend: ZoneBackend) -> None:
    assert (
        ask(backend, "x.y.wild.example.test").answer[0].name.to_text() == "x.y.wild.example.test."
    )
    # The wildcard's parent exists, so "wild" itself is NODATA, not a wildcard match.
    wild = ask(backend, "wild.example.test")
    assert wild.answer == []
    assert wild.rcode() == dns.rcode.NOERROR


def test_other_class_and_other_zone_are_refused(backend: ZoneBackend) -> None:
    chaos = query("www.example.test", "A")
    chaos.question[0].rdclass = dns.rdataclass.CH
    assert dns.message.from_wire(backend.answer(chaos.to_wire())).rcode() == dns.rcode.REFUSED
    assert ask(backend, "example.org").rcode() == dns.rcode.REFUSED


def test_zone_errors_are_one_line(tmp_path: Path) -> None:
    no_soa = tmp_path / "no-soa.zone"
    no_soa.write_text("$ORIGIN x.test.\n@ 300 IN NS ns\nns 300 IN A 192.0.2.1\n")
    with pytest.raises(ZoneError, match="no SOA"):
        ZoneBackend.from_file(no_soa)
    with pytest.raises(ZoneError, match="does not exist"):
        ZoneBackend.from_file(tmp_path / "absent.zone")


# --- admission of DoQ queries --------------------------------------------------------


def test_admit_rules() -> None:
    ok = query("www.example.test").to_wire()
    assert server_rules.admit(ok, early=False) is None
    assert server_rules.admit(ok, early=True) is None

    with pytest.raises(framing.DoqProtocolError, match="ID 7"):
        server_rules.admit(wire.set_id(ok, 7), early=False)
    keepalive = query(
        "www.example.test",
        use_edns=0,
        options=[dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, b"")],
    )
    with pytest.raises(framing.DoqProtocolError, match="keepalive"):
        server_rules.admit(keepalive.to_wire(), early=False)

    notify = query("example.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert server_rules.admit(notify.to_wire(), early=True) is None

    update = dns.update.UpdateMessage("example.test.")
    update.use_edns(0)
    update.id = 0
    assert server_rules.admit(update.to_wire(), early=False) is None
    refused = server_rules.admit(update.to_wire(), early=True)
    assert refused is not None
    reply = dns.message.from_wire(refused)
    assert reply.id == 0
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.opcode() == dns.opcode.UPDATE
    assert [error.code for error in reply.extended_errors()] == [26]

    # Malformed DNS is for the resolver (FORMERR), not a DoQ protocol error.
    assert server_rules.admit(b"\x00\x00\x01", early=False) is None


@given(st.binary(max_size=64), st.booleans())
def test_admit_only_ever_raises_protocol_errors(data: bytes, early: bool) -> None:
    try:
        server_rules.admit(data, early=early)
    except framing.DoqProtocolError:
        assert len(data) >= 2


def test_wants_padding() -> None:
    assert server_rules.wants_padding(query("a.test", use_edns=0, pad=128).to_wire())
    assert not server_rules.wants_padding(query("a.test", use_edns=0).to_wire())
    assert not server_rules.wants_padding(b"junk")


# --- ticket store ------------------------------------------------------------------------


def ticket(label: bytes) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=0,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(days=1),
        not_valid_before=now,
        resumption_secret=b"s" * 32,
        server_name="x.test",
        ticket=label,
    )


def test_tickets_are_single_use_and_expire() -> None:
    clock = [0.0]
    store = TicketStore(lifetime=60, timer=lambda: clock[0])
    store.add(ticket(b"one"))
    store.add(ticket(b"two"))
    assert store.pop(b"one") is not None
    assert store.pop(b"one") is None
    clock[0] = 61.0
    assert store.pop(b"two") is None
    assert (store.issued, store.resumed) == (2, 1)
    with pytest.raises(ValueError):
        TicketStore(lifetime=0)


async def test_cached_zone_answers_keep_each_clients_shape(backend: ZoneBackend) -> None:
    resolver = Resolver(backend)
    for name, want_rd in [
        ("WWW.Example.TEST", True),
        ("www.example.test", True),
        ("www.example.test", False),
    ]:
        message = query(name, "A", use_edns=0)
        if not want_rd:
            message.flags &= ~dns.flags.RD
        raw = await resolver.resolve(message.to_wire(), udp=False)
        assert raw is not None
        reply = dns.message.from_wire(raw)
        assert reply.question[0].name.to_text() == name + "."
        assert bool(reply.flags & dns.flags.RD) == want_rd
        assert reply.flags & dns.flags.AA
        assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["192.0.2.80"]
    without_edns = dns.message.from_wire(
        await resolver.resolve(query("www.example.test").to_wire(), udp=False) or b""
    )
    assert without_edns.edns < 0
