"""Routes and locally served names, without sockets."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from doqproxy.dns import wire
from doqproxy.dns.padding import repad
from doqproxy.routing.local_zones import DEFAULT_ZONES, LocalZones
from doqproxy.routing.names import suffixes, to_text, to_wire
from doqproxy.routing.router import affected, changed_domains
from doqproxy.routing.routes import (
    RouteError,
    RouteSpec,
    RouteTable,
    check_unique,
    parse_route,
    route_from_table,
)


def _ask(
    zones: LocalZones, name: str, rdtype: str = "A", **kwargs: object
) -> dns.message.Message | None:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    query.id = 4242
    data = query.to_wire()
    reply = zones.reply(wire.parse_question(data))
    if reply is None:
        return None
    message = dns.message.from_wire(reply)
    assert message.id == 4242
    assert message.flags & dns.flags.QR and message.flags & dns.flags.AA
    return message


def test_names_round_trip_and_suffixes() -> None:
    assert to_wire("Corp.Example") == b"\x04corp\x07example\x00"
    assert to_wire(".") == b"\x00"
    assert to_text(to_wire("a.b.")) == "a.b."
    assert [s for _, s in suffixes(to_wire("a.b"))] == [to_wire("a.b"), to_wire("b"), b"\x00"]


def test_parse_route_and_errors() -> None:
    spec = parse_route("Corp.Test,lan=udp://192.168.1.1, quic://dns.example")
    assert spec == RouteSpec(("corp.test.", "lan."), ("udp://192.168.1.1", "quic://dns.example"))
    for bad in ("corp.test", "=udp://1.2.3.4", "corp.test=", "a..b=udp://1.1.1.1"):
        with pytest.raises(RouteError) as info:
            parse_route(bad)
        assert "\n" not in str(info.value)
    table_spec = route_from_table({"domains": ["x.test"], "upstreams": ["udp://127.0.0.1"]}, "f")
    assert table_spec.domains == ("x.test.",)
    with pytest.raises(RouteError, match="unknown key 'upstream'"):
        route_from_table({"domains": ["x"], "upstream": ["u"]}, "f")
    with pytest.raises(RouteError, match="given twice"):
        check_unique([parse_route("a.test=udp://1.1.1.1"), parse_route("a.test=udp://2.2.2.2")])


def test_longest_suffix_wins() -> None:
    table = RouteTable({"corp.test.": "corp", "eu.corp.test.": "eu"}, "default")
    assert table.lookup(to_wire("host.eu.corp.test"))[1] == "eu"
    assert table.lookup(to_wire("HOST.Corp.Test"))[1] == "corp"
    assert table.lookup(to_wire("corp.test"))[1] == "corp"
    assert table.lookup(to_wire("xcorp.test"))[1] == "default"
    assert table.lookup(to_wire("example.org"))[1] == "default"
    assert RouteTable({".": "root"}, "unused").lookup(to_wire("a.b"))[1] == "root"


def test_localhost_answers_both_families_for_every_name_in_it() -> None:
    zones = LocalZones()
    reply = _ask(zones, "localhost.", "A")
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    assert [rd.to_text() for rd in reply.answer[0]] == ["127.0.0.1"]
    reply = _ask(zones, "Foo.LOCALHOST.", "AAAA", use_edns=0, want_dnssec=True)
    assert reply is not None and [rd.to_text() for rd in reply.answer[0]] == ["::1"]
    assert reply.answer[0].name.to_text() == "Foo.LOCALHOST."
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO
    reply = _ask(zones, "localhost.", "MX")
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA


@pytest.mark.parametrize(
    "name",
    [
        "printer.local.",
        "x.invalid.",
        "abc.onion.",
        "nas.home.arpa.",
        dns.reversename.from_address("192.168.1.10").to_text(),
        dns.reversename.from_address("10.1.2.3").to_text(),
        dns.reversename.from_address("172.20.0.1").to_text(),
        dns.reversename.from_address("169.254.1.1").to_text(),
        dns.reversename.from_address("100.100.1.1").to_text(),
        dns.reversename.from_address("fd12::1").to_text(),
        dns.reversename.from_address("fe80::1").to_text(),
    ],
)
def test_private_and_special_names_are_nxdomain_with_soa(name: str) -> None:
    reply = _ask(LocalZones(), name, "PTR" if "arpa" in name else "A", use_edns=0)
    assert reply is not None and reply.rcode() == dns.rcode.NXDOMAIN
    soa = reply.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 10800
    assert name.lower().endswith(soa.name.to_text().lower())
    assert soa.name.to_text().lower() in {z.lower() for z in DEFAULT_ZONES}


def test_loopback_ptr_names_localhost_and_public_names_are_left_alone() -> None:
    zones = LocalZones()
    reply = _ask(zones, dns.reversename.from_address("127.0.0.1").to_text(), "PTR")
    assert reply is not None and [rd.to_text() for rd in reply.answer[0]] == ["localhost."]
    reply = _ask(zones, dns.reversename.from_address("::1").to_text(), "PTR")
    assert reply is not None and [rd.to_text() for rd in reply.answer[0]] == ["localhost."]
    for name in ("example.com.", "x.test.", dns.reversename.from_address("8.8.8.8").to_text(),
                 dns.reversename.from_address("172.32.0.1").to_text()):  # fmt: skip
        assert _ask(zones, name, "PTR") is None
    assert _ask(LocalZones(enabled=False), "localhost.") is None
    between = _ask(zones, "0.0.127.in-addr.arpa.", "PTR")  # above 1.0.0.127: exists, no data
    assert between is not None and between.rcode() == dns.rcode.NOERROR and not between.answer
    apex = _ask(zones, dns.reversename.from_address("255.255.255.255").to_text(), "PTR")
    assert apex is not None and apex.rcode() == dns.rcode.NOERROR and not apex.answer
    assert apex.authority[0].rdtype == dns.rdatatype.SOA


def test_a_route_overrides_a_local_zone() -> None:
    zones = LocalZones(["168.192.in-addr.arpa.", "."])
    assert _ask(zones, "10.1.168.192.in-addr.arpa.", "PTR") is None
    assert _ask(zones, "10.1.16.172.in-addr.arpa.", "PTR") is not None
    assert _ask(LocalZones(["1.168.192.in-addr.arpa."]), "10.2.168.192.in-addr.arpa.") is not None


def test_repad_strips_or_sets_padding() -> None:
    query = dns.message.make_query("a.test.", "A", use_edns=0, pad=128)
    query.id = 0
    padded = query.to_wire()
    plain = repad(padded, None)
    parsed = wire.parse_question(plain)
    assert parsed.edns is not None and not parsed.edns.options
    again = repad(plain, 128)
    assert len(again) % 128 == 0
    assert dns.message.from_wire(again).question == query.question


def test_changed_routes_select_names_to_drop() -> None:
    old = {".": "quic://a", "corp.test.": "udp://1", "lan.": "udp://2"}
    new = {".": "quic://a", "corp.test.": "udp://9", "lan.": "udp://2", "vpn.": "udp://3"}
    changed = changed_domains(old, new)
    assert changed == ["corp.test.", "vpn."]
    drop = affected(changed, {**old, **new})
    assert drop(to_wire("host.corp.test"))
    assert drop(to_wire("x.vpn"))
    assert not drop(to_wire("printer.lan"))
    assert not drop(to_wire("example.com"))
    everything = affected(["."], {**old})
    assert everything(to_wire("example.com")) and not everything(to_wire("a.lan"))
