"""``doqproxy serve --upstream udp://...``: DoQ in front of a plain DNS server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import dns.asyncquery
import dns.edns
import dns.message
import dns.rdatatype
import pytest

from .serve_helpers import (
    SERVER_NAME,
    PlainDnsServer,
    ServeCerts,
    ServeProcess,
    query,
    rcode_of,
    rdatas,
    serve_certs,
    start_serve,
)

__all__ = ["serve_certs", "start_serve"]  # fixtures used by name

pytestmark = pytest.mark.slow


@pytest.fixture
async def plain() -> AsyncIterator[PlainDnsServer]:
    server = PlainDnsServer()
    await server.start()
    yield server
    await server.stop()


def forwarding(
    start_serve: Callable[..., ServeProcess], certs: ServeCerts, upstream_port: int
) -> ServeProcess:
    return start_serve(
        "--cert", certs.cert_file, "--key", certs.key_file,
        "--upstream", f"udp://127.0.0.1:{upstream_port}", "--timeout", "3",
    )  # fmt: skip


async def ask(
    server: ServeProcess, certs: ServeCerts, message: dns.message.Message
) -> dns.message.Message:
    return await dns.asyncquery.quic(
        message,
        "127.0.0.1",
        port=server.port,
        timeout=10.0,
        verify=certs.ca_file,
        server_hostname=SERVER_NAME,
    )


async def test_answers_through_a_plain_upstream(
    plain: PlainDnsServer, start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts
) -> None:
    server = forwarding(start_serve, serve_certs, plain.port)
    answer = await ask(server, serve_certs, query("www.plain.test", "A", use_edns=0))
    assert answer.id == 0
    assert rcode_of(answer) == "NOERROR"
    assert rdatas(answer) == ["198.51.100.7"]

    # A truncated UDP answer is asked again over TCP.
    big = await ask(server, serve_certs, query("big.plain.test", "TXT", use_edns=0))
    assert rcode_of(big) == "NOERROR"
    assert big.answer and big.answer[0].rdtype == dns.rdatatype.TXT
    assert len(big.answer[0]) == 2
    assert [transport for transport, _, name in plain.state.seen if name == "big.plain.test."] == [
        "udp",
        "tcp",
    ]

    # A reply with the wrong ID (a spoof) is ignored; the real one is used.
    spoofed = await ask(server, serve_certs, query("spoof.plain.test", "A"))
    assert rdatas(spoofed) == ["198.51.100.7"]

    # RFC 9250 §4.2.1: the plain server never sees ID 0, and IDs are not reused blindly.
    ids = [msg_id for _, msg_id, _ in plain.state.seen]
    assert len(ids) == 4
    assert 0 not in ids
    assert len(set(ids)) == len(ids)


async def test_padding_is_not_sent_to_plain_dns_but_comes_back_to_the_client(
    plain: PlainDnsServer, start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts
) -> None:
    server = forwarding(start_serve, serve_certs, plain.port)
    answer = await ask(server, serve_certs, query("pad.plain.test", "A", use_edns=0, pad=128))
    assert rdatas(answer) == ["198.51.100.7"]
    assert any(option.otype == dns.edns.PADDING for option in answer.options)
    assert plain.state.padded == [False]


async def test_unreachable_upstream_gives_servfail_with_ede(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts
) -> None:
    closed = PlainDnsServer()
    await closed.start()
    port = closed.port
    await closed.stop()  # nothing listens there any more: ICMP port unreachable
    server = forwarding(start_serve, serve_certs, port)
    answer = await ask(server, serve_certs, query("www.plain.test", "A", use_edns=0))
    assert rcode_of(answer) == "SERVFAIL"
    errors = answer.extended_errors()
    assert errors and errors[0].text is not None
    # The client learns that the backend failed, not where the backend is.
    assert errors[0].text.startswith("backend: ")
    assert str(port) not in errors[0].text and "127.0.0.1" not in errors[0].text
