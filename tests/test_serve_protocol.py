"""``doqproxy serve``: RFC 9250 behaviour seen from a raw aioquic client."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

import dns.edns
import dns.message
import dns.opcode
import dns.update
import pytest
from aioquic.quic.packet import QuicErrorCode

from .serve_helpers import (
    RawConnection,
    RawDoqClient,
    ServeCerts,
    ServeProcess,
    StreamResetError,
    client_configuration,
    open_raw,
    query,
    rcode_of,
    rdatas,
    serve_certs,
    start_serve,
    zone_file,
)

__all__ = ["serve_certs", "start_serve", "zone_file"]  # fixtures used by name

pytestmark = pytest.mark.slow

DOQ_NO_ERROR = 0x0
DOQ_PROTOCOL_ERROR = 0x2
DOQ_REQUEST_CANCELLED = 0x3
TLS_NO_APPLICATION_PROTOCOL = QuicErrorCode.CRYPTO_ERROR + 120


@pytest.fixture(scope="module")
def server(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> ServeProcess:
    return start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--max-streams", "5", "--stream-timeout", "1",
    )  # fmt: skip


async def connect(server: ServeProcess, certs: ServeCerts, **kwargs: object) -> RawConnection:
    return await open_raw(server.port, client_configuration(certs.ca_file), **kwargs)  # type: ignore[arg-type]


def framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


def with_id(message: dns.message.Message, msg_id: int) -> dns.message.Message:
    message.id = msg_id
    return message


PROTOCOL_ERRORS: dict[str, Callable[[RawDoqClient], object]] = {
    "message ID not 0": lambda c: c.send_raw(framed(with_id(query("www.example.test"), 4321))),
    "edns-tcp-keepalive": lambda c: c.send_raw(
        framed(
            query(
                "www.example.test",
                use_edns=0,
                options=[dns.edns.GenericOption(dns.edns.OptionType.KEEPALIVE, b"")],
            )
        )
    ),
    "length prefix 0": lambda c: c.send_raw(b"\x00\x00", end_stream=False),
    "FIN before the whole message": lambda c: c.send_raw(framed(query("www.example.test"))[:-3]),
    "two messages on a stream": lambda c: c.send_raw(
        framed(query("www.example.test")) * 2, end_stream=False
    ),
    "client unidirectional stream": lambda c: c.send_raw(
        framed(query("www.example.test")), uni=True
    ),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_with_doq_protocol_error(
    case: str, server: ServeProcess, serve_certs: ServeCerts
) -> None:
    connection = await connect(server, serve_certs)
    try:
        # The connection works before the violation.
        assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
        PROTOCOL_ERRORS[case](connection.client)
        closed = await asyncio.wait_for(connection.client.terminated, 10)
        assert closed.error_code == DOQ_PROTOCOL_ERROR
        assert closed.frame_type is None, "expected an application close, not a transport one"
    finally:
        connection.close()


async def test_alpn_other_than_doq_is_rejected(
    server: ServeProcess, serve_certs: ServeCerts
) -> None:
    configuration = client_configuration(serve_certs.ca_file, alpn="dot")
    connection = await open_raw(server.port, configuration, wait=False)
    try:
        closed = await asyncio.wait_for(connection.client.terminated, 10)
        assert closed.error_code == TLS_NO_APPLICATION_PROTOCOL
        assert not connection.client.handshake.done() or connection.client.handshake.exception()
    finally:
        connection.close()


async def test_stalled_stream_does_not_delay_others(
    server: ServeProcess, serve_certs: ServeCerts
) -> None:
    first = await connect(server, serve_certs)
    second = await connect(server, serve_certs)
    try:
        stalled = first.client.send_raw(b"\x00\x40", end_stream=False)  # a prefix, then nothing
        started = time.monotonic()
        same_connection = first.client.ask(query("www.example.test"), within=1.0)
        other_client = second.client.ask(query("mail.example.test"), within=1.0)
        answers = await asyncio.gather(same_connection, other_client)
        assert [rdatas(answer) for answer in answers] == [["192.0.2.80"], ["192.0.2.25"]]
        assert time.monotonic() - started < 1.0
        # After the read deadline (--stream-timeout 1) the stalled stream is reset, and
        # the connection carries on.
        with pytest.raises(StreamResetError) as reset:
            await first.client.answer(stalled, within=10)
        assert reset.value.code == DOQ_REQUEST_CANCELLED
        assert rdatas(await first.client.ask(query("ns1.example.test"))) == ["192.0.2.53"]
        assert not first.client.terminated.done()
    finally:
        first.close()
        second.close()


async def test_max_streams_queues_extra_streams(
    server: ServeProcess, serve_certs: ServeCerts
) -> None:
    connection = await connect(server, serve_certs)
    try:
        assert connection.client.remote_max_streams_at_handshake == 5
        names = [f"host{i}.wild.example.test" for i in range(50)]
        sids = [connection.client.send_query(query(name)) for name in names]
        answers = await asyncio.gather(*(connection.client.answer(sid, within=20) for sid in sids))
        for name, wire in zip(names, answers, strict=True):
            answer = dns.message.from_wire(wire)
            assert answer.question[0].name.to_text() == name + "."
            assert rdatas(answer) == ["192.0.2.99"]
    finally:
        connection.close()


async def test_zero_rtt_replayable_answered_update_refused(
    server: ServeProcess, serve_certs: ServeCerts
) -> None:
    first = await connect(server, serve_certs)
    assert rdatas(await first.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    ticket = await first.ticket()
    first.close()
    assert ticket.max_early_data_size == 0xFFFFFFFF

    sids: list[int] = []
    early = await open_raw(
        server.port,
        client_configuration(serve_certs.ca_file, ticket=ticket),
        early=lambda client: sids.append(client.send_query(query("mail.example.test"))),
    )
    try:
        handshake = early.client.handshake.result()
        assert handshake.session_resumed
        assert handshake.early_data_accepted
        assert rdatas(dns.message.from_wire(await early.client.answer(sids[0]))) == ["192.0.2.25"]
        next_ticket = await early.ticket()
    finally:
        early.close()

    update = dns.update.UpdateMessage("example.test.")
    update.use_edns(0)
    update.add("new", 300, "A", "192.0.2.200")
    update.id = 0
    sids.clear()
    refused = await open_raw(
        server.port,
        client_configuration(serve_certs.ca_file, ticket=next_ticket),
        early=lambda client: sids.append(client.send_query(update.to_wire())),
    )
    try:
        assert refused.client.handshake.result().early_data_accepted
        answer = dns.message.from_wire(await refused.client.answer(sids[0]))
        assert rcode_of(answer) == "REFUSED"
        assert [error.code for error in answer.extended_errors()] == [26]
        # Sent after the handshake, the same UPDATE is not "too early", just unsupported.
        late = dns.message.from_wire(
            await refused.client.answer(refused.client.send_query(update.to_wire()))
        )
        assert rcode_of(late) == "NOTIMP"
    finally:
        refused.close()


async def test_shutdown_and_idle_timeout(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    own = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--idle-timeout", "1",
    )  # fmt: skip
    idle = await connect(own, serve_certs)
    assert rdatas(await idle.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    idle_closed = await asyncio.wait_for(idle.client.terminated, 10)
    assert idle_closed.reason_phrase == "Idle timeout"  # our side timed out too, silently
    idle.close()
    await asyncio.sleep(0.5)

    busy = await connect(own, serve_certs)
    assert rdatas(await busy.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    assert await asyncio.to_thread(own.stop) == 0
    closed = await asyncio.wait_for(busy.client.terminated, 10)
    busy.close()
    assert closed.error_code == DOQ_NO_ERROR
    assert closed.frame_type is None
    stats = own.stats()
    assert stats["idle_timeouts"] == "1"
    assert stats["closes_sent"] == "{0: 1}"
    log = "\n".join(line for line in own.log().splitlines() if "running as root" not in line)
    assert "WARNING" not in log and "ERROR" not in log and "Traceback" not in log, log


async def test_max_connections_refuses_extra(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    own = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--max-connections", "2",
    )  # fmt: skip
    kept = [await connect(own, serve_certs) for _ in range(2)]
    extra = await open_raw(own.port, client_configuration(serve_certs.ca_file), wait=False)
    try:
        closed = await asyncio.wait_for(extra.client.terminated, 10)
        assert closed.error_code == QuicErrorCode.CONNECTION_REFUSED
        assert closed.frame_type is not None  # a transport close, sent before any handshake
        for connection in kept:
            assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    finally:
        extra.close()
        for connection in kept:
            connection.close()
    # Once a slot is free (after the closing connection's draining period), a new
    # connection is accepted.
    deadline = time.monotonic() + 10
    while True:
        again = await open_raw(own.port, client_configuration(serve_certs.ca_file), wait=False)
        try:
            await asyncio.wait_for(asyncio.shield(again.client.handshake), 5)
            assert rdatas(await again.client.ask(query("www.example.test"))) == ["192.0.2.80"]
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "no connection accepted after others closed"
            await asyncio.sleep(0.2)
        finally:
            again.close()


async def test_retry_validates_addresses(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    own = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--retry",
    )  # fmt: skip
    connection = await connect(own, serve_certs)
    try:
        assert connection.client._quic._retry_source_connection_id is not None
        assert rdatas(await connection.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    finally:
        connection.close()
