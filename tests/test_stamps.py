"""DNS stamps: public test vectors, round trips, and one-line errors."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from doqproxy.net import stamps
from doqproxy.net.stamps import Stamp, StampError, encode_stamp, parse_stamp
from doqproxy.upstream.targets import parse_target

from .conftest import SERVER_NAME, Certs, ProxyProcess, doqproxy_command, free_port
from .doq_fixture import DoqTestUpstream
from .serve_helpers import rdatas

ADGUARD_DOQ = (
    "sdns://BAcAAAAAAAAADTk0LjE0MC4xNC4xNDAgmjo09yfeubylEAPZzpw5-PJ92cUkKQHCurGkTmNaAhkeZG5zLXVu"
    "ZmlsdGVyZWQuYWRndWFyZC5jb206ODUz"
)
ADGUARD_DOQ_V6 = (
    "sdns://BAcAAAAAAAAAE1syYTEwOjUwYzA6OmRlZDpmZl0AH2ZjZmZhZjEzLmQuYWRndWFyZC1kbnMuY29tOjg4NTM"
)
EMERALD_DOQ = "sdns://BAcAAAAAAAAAAAAUZG5zLmVtZXJhbGRvbmlvbi5vcmc"
CLOUDFLARE_DOT = "sdns://AwcAAAAAAAAAAAAgMWRvdDFkb3QxZG90MS5jbG91ZGZsYXJlLWRucy5jb20"


def test_public_doq_stamp_gives_host_port_name_and_address() -> None:
    stamp = parse_stamp(ADGUARD_DOQ)
    assert stamp.protocol == stamps.DOQ
    assert stamp.props & stamps.PROP_DNSSEC and stamp.props & stamps.PROP_NO_LOGS
    assert stamp.address == "94.140.14.140"
    assert stamp.hostname == "dns-unfiltered.adguard.com:853"
    assert len(stamp.hashes) == 1 and len(stamp.hashes[0]) == 32
    target = parse_target(ADGUARD_DOQ, ("quic",))
    assert str(target.url) == "quic://dns-unfiltered.adguard.com:853"
    assert target.addresses == ("94.140.14.140",)


def test_ipv6_address_and_non_default_port() -> None:
    target = parse_target(ADGUARD_DOQ_V6, ("quic",))
    assert target.url.host == "fcffaf13.d.adguard-dns.com" and target.url.port == 8853
    assert target.addresses == ("2a10:50c0::ded:ff",)
    target = parse_target(EMERALD_DOQ, ("quic",))
    assert (target.url.host, target.url.port, target.addresses) == ("dns.emeraldonion.org", 853, ())


def test_dot_and_plain_stamps() -> None:
    target = parse_target(CLOUDFLARE_DOT, ("quic", "tls"))
    assert str(target.url) == "tls://1dot1dot1dot1.cloudflare-dns.com:853"
    plain = encode_stamp(Stamp(stamps.PLAIN, address="192.0.2.53:5353"))
    assert str(parse_target(plain, ("udp",)).url) == "udp://192.0.2.53:5353"
    with pytest.raises(ValueError, match="not accepted here"):
        parse_target(plain, ("quic",))


@pytest.mark.parametrize("text", [ADGUARD_DOQ, ADGUARD_DOQ_V6, EMERALD_DOQ, CLOUDFLARE_DOT])
def test_round_trip(text: str) -> None:
    assert encode_stamp(parse_stamp(text)) == text


def test_round_trip_of_every_field() -> None:
    stamp = Stamp(stamps.DOQ, 7, "[2001:db8::1]:784", (b"\x01" * 32, b"\x02" * 32),
                  "doq.example:784", ("192.0.2.1", "192.0.2.2"))  # fmt: skip
    assert parse_stamp(encode_stamp(stamp)) == stamp


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("sdns://", "truncated"),
        ("sdns://!!!", "base64"),
        ("sdns://AQcAAAAAAAAA", "DNSCrypt"),
        ("sdns://AgcAAAAAAAAAAAAPZG5zLmV4YW1wbGUuY29tCi9kbnMtcXVlcnk", "DNS-over-HTTPS"),
        (EMERALD_DOQ[:-4], "truncated"),
        (encode_stamp(Stamp(stamps.DOQ, address="192.0.2.1")), "no host name"),
        (ADGUARD_DOQ + "AAAA", "unexpected"),
    ],
)
def test_bad_stamps_give_one_line(text: str, why: str) -> None:
    with pytest.raises(StampError, match=why) as info:
        parse_stamp(text)
    assert "\n" not in str(info.value)


def test_bad_stamp_on_the_command_line_is_one_line_of_error() -> None:
    argv = doqproxy_command(
        "forward", "-l", "127.0.0.1:0", "-u", "quic://127.0.0.1",
        "--route", "a.test=sdns://AQcAAAAAAAAA",
    )  # fmt: skip
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DNSCrypt" in lines[0], result.stderr


def _doq_stamp(port: int) -> str:
    return encode_stamp(
        Stamp(stamps.DOQ, stamps.PROP_DNSSEC, f"127.0.0.1:{port}", (), f"{SERVER_NAME}:{port}")
    )


async def test_forward_and_query_accept_a_stamp(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    stamp = _doq_stamp(upstream.port)
    port = free_port()
    argv = ["forward", "-l", f"127.0.0.1:{port}", "-u", stamp, "--tls-ca-file", certs.ca_file,
            "--state-dir", str(tmp_path / "state"), "--no-cache"]  # fmt: skip
    proxy = ProxyProcess(argv, port, tmp_path / "proxy.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        query = dns.message.make_query("a.test", "A")
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=15)
        assert rdatas(reply) == ["192.0.2.1"]
    finally:
        proxy.stop()
    process = await asyncio.create_subprocess_exec(
        *doqproxy_command("query", "-u", stamp, "--tls-ca-file", certs.ca_file, "n3.test"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    assert "192.0.2.13" in out.decode()
