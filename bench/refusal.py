"""``python -m bench.refusal``: what refusing one new QUIC connection costs ``serve``.

Compares the refusal :mod:`doqproxy.frontend.doq_guard` sends before any TLS work (a
CONNECTION_CLOSE in an Initial built from the client's connection IDs) with the old
path: a server :class:`QuicConnection` that processes the ClientHello, then closes.
Both run on the same 300 real client Initials, in-process, one core.
"""

from __future__ import annotations

import ssl
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, pull_quic_header

from doqproxy import devcerts
from doqproxy.frontend.doq_guard import refusal_packet

COUNT = 300


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, cert, key = devcerts.make_certificates(Path(tmp), "refusal.test", label="bench")
        server = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
        server.load_cert_chain(str(cert), str(key))
    client = QuicConfiguration(
        is_client=True, alpn_protocols=["doq"], server_name="refusal.test",
        verify_mode=ssl.CERT_NONE,
    )  # fmt: skip
    initials = []
    for _ in range(COUNT):
        quic = QuicConnection(configuration=replace(client))
        quic.connect(("127.0.0.1", 853), now=0.0)
        initials.append(quic.datagrams_to_send(now=0.0)[0][0])
    started = time.perf_counter()
    for data in initials:
        header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        refusal_packet(header, "too many connections")
    cheap = (time.perf_counter() - started) / COUNT
    started = time.perf_counter()
    for data in initials:
        header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        connection = QuicConnection(
            configuration=server, original_destination_connection_id=header.destination_cid
        )
        connection.receive_datagram(data, ("127.0.0.1", 5000), now=0.0)
        connection.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase="full")
        connection.datagrams_to_send(now=0.0)
    full = (time.perf_counter() - started) / COUNT
    print(f"refused before TLS (serve now): {cheap * 1e6:.0f} µs per connection")
    print(f"refused after the ClientHello (before): {full * 1e6:.0f} µs per connection")
    print(f"ratio: {full / cheap:.1f}x")


if __name__ == "__main__":
    main()
