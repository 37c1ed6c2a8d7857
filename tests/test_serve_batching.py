"""``doqproxy serve`` sends the answers finished in one loop turn together: the queries
of one client datagram, answered from the zone, come back in one datagram, not one
each (as quic-go's send loop does; it halves the client's work per answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.message

from .serve_helpers import (
    ServeCerts,
    ServeProcess,
    client_configuration,
    open_raw,
    query,
    serve_certs,
    start_serve,
    zone_file,
)

__all__ = ["serve_certs", "start_serve", "zone_file"]  # fixtures used by name

QUERIES = 6


async def test_answers_to_one_datagram_leave_in_one(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    server = start_serve("--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
                         "--zone", zone_file)  # fmt: skip
    connection = await open_raw(server.port, client_configuration(serve_certs.ca_file))
    client = connection.client
    try:
        await connection.ticket()  # the handshake's last datagrams are in
        await asyncio.sleep(0.5)
        quic = client._quic
        streams = []
        for _ in range(QUERIES):  # written together: one datagram (unpadded, small)
            sid = quic.get_next_available_stream_id()
            wire = query("www.example.test", use_edns=False).to_wire()
            client.answers[sid] = asyncio.get_running_loop().create_future()
            quic.send_stream_data(sid, len(wire).to_bytes(2, "big") + wire, end_stream=True)
            streams.append(sid)
        before = client.datagrams
        client.transmit()
        for sid in streams:
            answer = dns.message.from_wire(await client.answer(sid, within=10))
            assert [str(r) for r in answer.answer[0]] == ["192.0.2.80"]
        # One datagram with the six answers (and the ACK); one each before.
        assert client.datagrams - before <= 2, client.datagrams - before
    finally:
        connection.close()
