"""``doqproxy serve`` under hostile clients (attack session 6): floods of queries on
many connections, streams the client stops (STOP_SENDING) or resets right after
writing them, connections closed or abandoned while their answers are batched for
the next loop turn. The server keeps answering others and logs no traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


async def test_hostile_clients_do_not_stop_serve(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    server = start_serve("--cert", serve_certs.cert_file, "--key", serve_certs.key_file,
                         "--zone", zone_file)  # fmt: skip
    configuration = client_configuration(serve_certs.ca_file)
    wire = query("www.example.test", use_edns=False).to_wire()
    framed = len(wire).to_bytes(2, "big") + wire
    for _round in range(3):
        connections = await asyncio.gather(
            *(open_raw(server.port, configuration) for _ in range(8))
        )
        for n, connection in enumerate(connections):
            quic = connection.client._quic
            for i in range(60):
                sid = quic.get_next_available_stream_id()
                quic.send_stream_data(sid, framed, end_stream=i % 3 != 0)
                if i % 4 == 1:
                    quic.stop_stream(sid, 0x5)
                if i % 5 == 2:
                    quic.reset_stream(sid, 0x5)
            connection.client.transmit()
            if n % 2 == 0:
                connection.close()  # mid-answer, with a CONNECTION_CLOSE
            elif n % 3 == 0:
                connection.transport.close()  # abandoned: no close at all
        await asyncio.sleep(0.2)
        for connection in connections:
            connection.close()
    fresh = await open_raw(server.port, configuration)
    try:
        answer = await fresh.client.ask(query("www.example.test"), within=10)
        assert [str(r) for r in answer.answer[0]] == ["192.0.2.80"]
    finally:
        fresh.close()
    assert server.proc.poll() is None, server.log()
    assert "Traceback" not in server.log(), server.log()
