"""UDP replies are capped at ``--max-udp-size`` (default 1232), however large the
client's EDNS buffer: fresh and cached answers alike, and our OPT advertises the cap."""

from __future__ import annotations

from collections.abc import Callable

import dns.asyncquery
import dns.flags
import dns.message
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.dns.wire import parse_question

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

StartProxy = Callable[..., ProxyProcess]


async def _udp(proxy: ProxyProcess, name: str, payload: int) -> tuple[dns.message.Message, int]:
    query = dns.message.make_query(name, "TXT", use_edns=0, payload=payload)
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    return response, len(response.to_wire())


@pytest.mark.parametrize("cache", [False, True])
async def test_default_cap_truncates_large_buffers(
    upstream: DoqTestUpstream, start_proxy: StartProxy, cache: bool
) -> None:
    proxy = start_proxy(upstream.port, cache=cache)
    for _ in range(2):  # with the cache on, the second round is served from it
        response, size = await _udp(proxy, "big.test.", 65535)
        assert response.flags & dns.flags.TC, "a 16 KB answer must not go out over UDP"
        assert size <= 1232
        assert response.payload == 1232, "our OPT advertises the cap"
        # ~800 octets fit under the cap whatever the client offers
        response, size = await _udp(proxy, "mid.test.", 65535)
        assert not response.flags & dns.flags.TC and 700 < size <= 1232
        assert response.payload == 1232
    # TCP is not capped.
    query = dns.message.make_query("big.test.", "TXT", use_edns=0, payload=65535)
    response = await dns.asyncquery.tcp(query, "127.0.0.1", port=proxy.port, timeout=10)
    assert not response.flags & dns.flags.TC and len(response.to_wire()) > 16000


async def test_lowered_cap(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, "--max-udp-size", "512")
    response, size = await _udp(proxy, "mid.test.", 4096)
    assert response.flags & dns.flags.TC and size <= 512 and response.payload == 512


def test_bad_value_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from .conftest import doqproxy_command

    result = subprocess.run(
        doqproxy_command("forward", "-u", "quic://127.0.0.1", "--max-udp-size", "100"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--max-udp-size" in result.stderr and "Traceback" not in result.stderr


def test_pure_limit() -> None:
    query = dns.message.make_query("x.test.", "A", use_edns=0, payload=65535).to_wire()
    question = parse_question(query)
    assert wire.udp_payload_limit(question) == 1232
    assert wire.udp_payload_limit(question, 4096) == 4096
    plain = parse_question(dns.message.make_query("x.test.", "A").to_wire())
    assert wire.udp_payload_limit(plain) == 512
    assert rewrite.OUR_UDP_PAYLOAD == wire.DEFAULT_MAX_UDP == 1232
