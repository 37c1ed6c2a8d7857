"""The LAN-safety rules as pure logic: access list, rate limit, TCP slots, admission."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.frontend.access import (
    REFLECTION_PORTS,
    AccessError,
    default_access,
    listener_reaches_lan,
    local_networks,
    parse_allow,
)
from doqproxy.frontend.admission import (
    DROP,
    AccessSettings,
    Admission,
    minimal_any_reply,
    strip_ede_text,
)
from doqproxy.frontend.ratelimit import Decision, TokenBuckets, prefix_key
from doqproxy.frontend.slots import Admit, SlotLimits, SlotTable
from doqproxy.net.interfaces import InterfaceAddress, interface_addresses, parse_addr_dump

LAN = [
    InterfaceAddress(1, ipaddress.ip_interface("127.0.0.1/8")),
    InterfaceAddress(1, ipaddress.ip_interface("::1/128")),
    InterfaceAddress(2, ipaddress.ip_interface("192.168.1.10/24")),
    InterfaceAddress(2, ipaddress.ip_interface("fd00:1::10/64")),
    InterfaceAddress(3, ipaddress.ip_interface("10.9.0.1/16")),
]


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def query(name: str = "a.test.", rdtype: str = "A", *, rd: bool = True, edns: bool = True) -> bytes:
    message = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    if not rd:
        message.flags &= ~dns.flags.RD
    return message.to_wire()


# --- access list -------------------------------------------------------------------


def test_default_is_loopback_plus_the_listen_interfaces_subnets() -> None:
    networks = local_networks(["192.168.1.10"], LAN)
    assert networks == (
        net("127.0.0.0/8"),
        net("::1/128"),
        net("192.168.1.0/24"),
        net("fd00:1::/64"),
    )
    assert local_networks(["127.0.0.1"], LAN) == (net("127.0.0.0/8"), net("::1/128"))
    wildcard = local_networks(["0.0.0.0"], LAN)
    assert net("10.9.0.0/16") in wildcard and net("192.168.1.0/24") in wildcard
    # An address on no interface (a non-local bind) adds nothing.
    assert local_networks(["203.0.113.5"], LAN) == (net("127.0.0.0/8"), net("::1/128"))


def test_allow_values() -> None:
    access = default_access(["192.168.7.9/24", "2001:db8::/32"], ["0.0.0.0"], LAN)
    assert access.allows(ipaddress.ip_address("192.168.7.200"))
    assert access.allows(ipaddress.ip_address("127.0.0.1"))  # loopback always
    assert not access.allows(ipaddress.ip_address("192.168.1.10"))  # explicit list replaces LAN
    assert default_access(["any"], ["0.0.0.0"], []).open
    assert parse_allow(["10.0.0.1"]) == ((net("10.0.0.1/32"),), False)
    with pytest.raises(AccessError, match="not a network"):
        parse_allow(["10.0.0.0/33"])


def test_reaches_lan() -> None:
    assert not listener_reaches_lan(["127.0.0.53", "::1"])
    assert listener_reaches_lan(["127.0.0.1", "0.0.0.0"])
    assert listener_reaches_lan(["192.168.1.10"])
    assert listener_reaches_lan(["::"])


def test_reflection_ports_keep_dns_and_ephemeral_ports() -> None:
    assert {0, 7, 13, 19, 37, 123, 137, 161, 389, 1900, 11211} <= REFLECTION_PORTS
    assert 53 not in REFLECTION_PORTS
    assert not any(port >= 32768 for port in REFLECTION_PORTS)


# --- rate limit ----------------------------------------------------------------------


def test_token_bucket_refills_and_slips() -> None:
    buckets = TokenBuckets(10, slip=2)
    key = (4, 1)
    assert [buckets.take(key, 0.0) for _ in range(10)] == [Decision.PASS] * 10
    over = [buckets.take(key, 0.0) for _ in range(6)]
    assert over == [Decision.DROP, Decision.SLIP] * 3
    assert buckets.take(key, 0.1) is Decision.PASS  # 0.1 s = one token
    assert buckets.take(key, 0.1) is not Decision.PASS
    assert buckets.take((4, 2), 0.1) is Decision.PASS  # another prefix has its own bucket


def test_bucket_table_is_bounded() -> None:
    buckets = TokenBuckets(1, max_buckets=100)
    for i in range(10_000):
        buckets.take((6, i), float(i))
    assert len(buckets) == 100


def test_prefix_keys() -> None:
    v4 = ipaddress.ip_address
    assert prefix_key(v4("127.0.1.1"), 24, 56) == prefix_key(v4("127.0.1.200"), 24, 56)
    assert prefix_key(v4("127.0.1.1"), 24, 56) != prefix_key(v4("127.0.2.1"), 24, 56)
    assert prefix_key(v4("2001:db8:0:ff::1"), 24, 56) == prefix_key(v4("2001:db8:0:1::9"), 24, 56)
    assert prefix_key(v4("2001:db8:0:100::1"), 24, 56) != prefix_key(v4("2001:db8::1"), 24, 56)


# --- TCP slots -------------------------------------------------------------------------


def test_slots_per_prefix_reserve_and_eviction() -> None:
    table = SlotTable(
        SlotLimits(max_connections=16, max_per_ip=4, max_per_prefix=8, reserve=4, few=2)
    )
    for i in range(8):
        assert table.admit(f"10.0.0.{i // 4}", "p1") is Admit.YES
        table.add(f"10.0.0.{i // 4}", "p1")
    assert table.admit("10.0.0.9", "p1") is Admit.NO  # the prefix holds its share
    assert table.admit("10.0.0.0", "p1") is Admit.NO
    for i in range(4):
        table.add(f"10.1.0.{i}", "p2")
    # 12 = 16 - reserve: a prefix holding many may only evict an idle connection ...
    assert table.admit("10.1.0.9", "p2") is Admit.EVICT
    table.add("10.3.0.1", "p3")
    # ... and not at all once the reserve is in use; a newcomer prefix may still come in.
    assert table.admit("10.1.0.9", "p2") is Admit.NO
    assert table.admit("10.4.0.1", "p4") is Admit.YES
    for i in range(3):
        table.add(f"10.5.0.{i}", f"q{i}")
    assert table.total == 16
    assert table.admit("10.6.0.1", "p6") is Admit.EVICT  # full: close the oldest idle one
    table.remove("10.0.0.0", "p1")
    assert table.per_ip["10.0.0.0"] == 3


# --- admission -------------------------------------------------------------------------


def admission(**options: object) -> Admission:
    settings = AccessSettings(**options)  # type: ignore[arg-type]
    access = default_access(settings.allow, ["0.0.0.0"], LAN)
    return Admission(settings, access, reaches_lan=True)


def test_udp_rules_in_order() -> None:
    gate = admission(ratelimit=5, ratelimit_slip=2)
    data = query()
    assert gate.udp_query(data, "192.168.1.20", 19, 0.0) == DROP
    assert gate.udp_query(data, "203.0.113.7", 4000, 0.0) == DROP
    assert gate.stats.refused["reflection"] == 1 and gate.stats.refused["acl"] == 1
    assert [gate.udp_query(data, "192.168.1.20", 4000, 0.0) for _ in range(5)] == [None] * 5
    assert gate.udp_query(data, "192.168.1.20", 4000, 0.0) == DROP
    slipped = gate.udp_query(data, "192.168.1.21", 4000, 0.0)  # same /24
    assert slipped and dns.message.from_wire(slipped).flags & dns.flags.TC
    assert gate.stats.ratelimited == {"drop": 1, "slip": 1}
    snoop = gate.udp_query(query(rd=False), "10.9.3.3", 4000, 0.0)
    assert snoop and dns.message.from_wire(snoop).rcode() == dns.rcode.REFUSED
    assert gate.udp_query(query(rd=False), "127.0.0.1", 4000, 0.0) is None  # loopback may snoop
    assert gate.stats.refused["snoop"] == 1


def test_refuse_action_and_any() -> None:
    gate = admission(refused_action="refuse", ratelimit=0)
    refused = gate.udp_query(query(), "203.0.113.7", 4000, 0.0)
    assert refused and dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED
    answered = gate.udp_query(query("x.test.", "ANY"), "192.168.1.20", 4000, 0.0)
    assert answered is not None
    again = gate.udp_query(query("x.test.", "ANY"), "192.168.1.20", 4000, 0.0)
    assert again is not None and again[2:] == answered[2:]
    assert admission(refuse_any=False).udp_query(query("x.", "ANY"), "127.0.0.1", 53, 0) is None


def test_minimal_any_reply_is_one_hinfo() -> None:
    data = query("Example.TEST.", "ANY")
    reply = minimal_any_reply(data)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.id == dns.message.from_wire(data).id
    assert message.rcode() == dns.rcode.NOERROR and message.edns == 0
    (rrset,) = message.answer
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset.name.to_text() == "Example.TEST."
    assert rrset[0].cpu == b"RFC8482" and rrset[0].os == b""
    assert len(reply) < 80
    assert minimal_any_reply(data[:20]) is None


def test_error_replies_spend_their_own_budget() -> None:
    gate = admission(ratelimit=100, ratelimit_errors=3)
    client = gate.client("192.168.1.20")
    formerr = wire.header_only_reply(query(), wire.RCODE_FORMERR)
    sent = [gate.udp_reply(formerr, client, 0.0) for _ in range(10)]
    assert sent.count(DROP) == 7
    assert gate.stats.errors_limited == 7
    noerror = b"\x00\x01\x81\x80" + b"\x00" * 8
    assert gate.udp_reply(noerror, client, 0.0) == noerror


def servfail(text: str) -> bytes:
    question = wire.parse_question(query())
    return wire.error_reply(question, wire.RCODE_SERVFAIL, ede=(Ede.NETWORK_ERROR, text))


def test_ede_text_only_for_loopback_unless_full() -> None:
    reply = servfail("quic://127.0.0.1:853: connection refused")
    stripped = strip_ede_text(reply)
    (option,) = dns.message.from_wire(stripped).options
    assert isinstance(option, dns.edns.EDEOption)
    assert option.code == Ede.NETWORK_ERROR and not option.text
    gate = admission()
    assert gate.ede_for(reply, gate.client("127.0.0.1")) == reply
    assert gate.ede_for(reply, gate.client("192.168.1.20")) == stripped
    full = admission(ede_detail="full")
    assert full.ede_for(reply, full.client("192.168.1.20")) == reply
    assert strip_ede_text(reply[:-3]) == reply[:-3]  # not our shape: untouched


def test_overloaded_is_servfail_with_ede() -> None:
    gate = admission(max_in_flight=2)
    assert gate.overloaded(query(), 1) is None
    reply = gate.overloaded(query(), 2)
    assert reply
    message = dns.message.from_wire(reply)
    assert message.rcode() == dns.rcode.SERVFAIL
    assert message.options[0].code == Ede.OTHER  # type: ignore[attr-defined]
    assert gate.stats.refused["inflight_cap"] == 1


# --- interfaces ------------------------------------------------------------------------


def _nl(kind: int, body: bytes) -> bytes:
    message = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return message + b"\x00" * (-len(message) % 4)


def _rta(kind: int, value: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(value), kind) + value
    return attr + b"\x00" * (-len(attr) % 4)


def test_parse_addr_dump() -> None:
    v4 = (
        struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 7)
        + _rta(1, bytes([10, 0, 0, 9]))
        + _rta(2, bytes([192, 168, 5, 1]))
    )
    v6 = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 7) + _rta(
        1, ipaddress.IPv6Address("fd00::5").packed
    )
    found, done = parse_addr_dump(_nl(20, v4) + _nl(20, v6) + _nl(3, b"\x00" * 4))
    assert done
    assert found == [
        InterfaceAddress(7, ipaddress.ip_interface("192.168.5.1/24")),  # IFA_LOCAL wins
        InterfaceAddress(7, ipaddress.ip_interface("fd00::5/64")),
    ]
    assert parse_addr_dump(_nl(20, v4)) == (found[:1], False)


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip to compare with")
def test_interface_addresses_match_ip_addr() -> None:
    ours = {(item.index, str(item.interface)) for item in interface_addresses()}
    shown = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout)
    theirs = {
        (link["ifindex"], f"{info['local']}/{info['prefixlen']}")
        for link in shown
        for info in link.get("addr_info", [])
    }
    assert ours == theirs


# --- smaller items -----------------------------------------------------------------------


def test_qtype_label_is_a_fixed_set() -> None:
    from doqproxy.ops.observers import qtype_label

    assert qtype_label(1) == "A" and qtype_label(65) == "HTTPS" and qtype_label(255) == "ANY"
    labels = {qtype_label(qtype) for qtype in range(-1, 65536)}
    assert "other" in labels and "NONE" in labels
    assert len(labels) <= 30


def test_failure_log_aggregates(caplog: pytest.LogCaptureFixture) -> None:
    from doqproxy.resolver import FailureLog

    now = [0.0]
    failures = FailureLog(interval=10.0, burst=3, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="doqproxy.resolver"):
        for _ in range(500):
            failures.note("a.test.", 22, "upstream: timeout")
        for i in range(10):
            failures.note(f"n{i}.test.", 22, "upstream: timeout")
        now[0] = 11.0
        failures.note("a.test.", 22, "upstream: timeout")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "SERVFAIL for a.test.: upstream: timeout",
        "SERVFAIL for n0.test.: upstream: timeout",
        "SERVFAIL for n1.test.: upstream: timeout",
        "8 more SERVFAIL lines were held back in 10s",
        "SERVFAIL for a.test.: upstream: timeout (and 499 more like it)",
    ]
