"""The QUIC engine's own floor: client CPU per DoQ query with no sockets at all.

A client and a server connection of one engine talk in memory (sans-I/O), and
only the client's calls are timed: opening streams and writing queries, building
packets, reading the server's packets and taking the answers out as events. The
traffic has the shape the real miss path has: the client sends ``batch`` queries
per packet-building turn (what batched sends give under load) and the server
sends the answers to one turn's queries together, padded to 468 octets, as
``doqproxy serve`` (and quic-go's send loop) does: two fit in a packet. With
``--apart`` it sends each answer in a packet of its own instead, as serve did
before 2026-12-01. ACKs ride on the next turn's queries.

What this measures is the least CPU per query any forwarder built on that engine
can spend on QUIC alone; the syscalls (a datagram read and a reply written per
client query, plus the upstream datagrams) and the DNS work come on top.

``python -m bench.engine_floor [--engine aioquic|qh3] [--batch N ...] [--queries N]``
prints one JSON line per (engine, batch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import ssl
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from doqproxy import devcerts

SERVER_NAME = "doq.bench.test"
SERVER_ADDR = ("127.0.0.1", 853)
CLIENT_ADDR = ("127.0.0.1", 40000)

# A padded query (128 octets, as doqproxy sends upstream) and a padded answer
# (468 octets, as serve answers padded queries), each with its 2-octet length.
QUERY = struct.pack("!H", 128) + bytes(128)
ANSWER = struct.pack("!H", 468) + bytes(468)


def _modules(engine: str) -> tuple[Any, Any, Any]:
    return (
        importlib.import_module(f"{engine}.quic.configuration"),
        importlib.import_module(f"{engine}.quic.connection"),
        importlib.import_module(f"{engine}.quic.events"),
    )


def _connections(engine: str, certs: tuple[Path, Path, Path]) -> tuple[Any, Any, Any]:
    configuration, connection, events = _modules(engine)
    ca, cert, key = certs
    server_conf = configuration.QuicConfiguration(is_client=False, alpn_protocols=["doq"])
    server_conf.load_cert_chain(str(cert), str(key))
    client_conf = configuration.QuicConfiguration(
        is_client=True,
        alpn_protocols=["doq"],
        server_name=SERVER_NAME,
        verify_mode=ssl.CERT_REQUIRED,
    )
    client_conf.load_verify_locations(cafile=str(ca))
    client = connection.QuicConnection(configuration=client_conf)
    client.connect(SERVER_ADDR, now=time.monotonic())
    server = connection.QuicConnection(
        configuration=server_conf,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    done = False
    for _ in range(20):
        now = time.monotonic()
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT_ADDR, now=now)
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
        while (event := client.next_event()) is not None:
            done = done or isinstance(event, events.HandshakeCompleted)
        while server.next_event() is not None:
            pass
        if done:
            break
    if not done:
        raise RuntimeError(f"{engine}: the in-memory handshake did not complete")
    if hasattr(client, "_ack_delay"):
        client._ack_delay = 0.0  # aioquic: the ACK goes with the next turn's queries
    return client, server, events


def measure(
    engine: str, batch: int, queries: int, certs: tuple[Path, Path, Path], *, apart: bool = False
) -> dict[str, Any]:
    """Client CPU per query (µs) and packets per query each way, for one engine and batch."""
    client, server, events = _connections(engine, certs)
    stream_data = events.StreamDataReceived
    clock = time.thread_time  # CPU: time preempted by other processes is not the engine's
    spent = 0.0
    up = down = answered = 0
    rounds = max(1, queries // batch)
    total = rounds * batch
    # The last turns write nothing: they collect answers the server's congestion
    # window held back (and send the ACKs that open it).
    for turn in range(rounds + 20):
        if turn >= rounds and answered == total:
            break
        writes = batch if turn < rounds else 0
        # Client: write a batch of queries, build its packets (timed).
        start = clock()
        now = time.monotonic()
        for _ in range(writes):
            client.send_stream_data(client.get_next_available_stream_id(), QUERY, end_stream=True)
        outgoing = client.datagrams_to_send(now=now)
        client.get_timer()
        spent += clock() - start
        up += len(outgoing)
        # Server (not timed): the turn's answers together, or one packet each.
        packets = []
        for data, _addr in outgoing:
            server.receive_datagram(data, CLIENT_ADDR, now=now)
        while (event := server.next_event()) is not None:
            if isinstance(event, stream_data) and event.end_stream:
                server.send_stream_data(event.stream_id, ANSWER, end_stream=True)
                if apart:
                    packets.extend(data for data, _addr in server.datagrams_to_send(now=now))
        packets.extend(data for data, _addr in server.datagrams_to_send(now=now))
        down += len(packets)
        # Client: read the answers (timed).
        start = clock()
        now = time.monotonic()
        for data in packets:
            client.receive_datagram(data, SERVER_ADDR, now=now)
            while (event := client.next_event()) is not None:
                if isinstance(event, stream_data) and event.end_stream:
                    answered += 1
        client.get_timer()
        spent += clock() - start
    if answered != total:
        raise RuntimeError(f"{engine}: {answered} of {total} answers arrived")
    return {
        "engine": engine,
        "batch": batch,
        "answers": "apart" if apart else "together",
        "queries": total,
        "cpu_us_per_query": round(1e6 * spent / total, 1),
        "packets_up_per_query": round(up / total, 3),
        "packets_down_per_query": round(down / total, 3),
    }


def run(
    engines: list[str], batches: list[int], queries: int, *, apart: bool = False
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="doqproxy-floor-") as tmp:
        ca, cert, key = devcerts.make_certificates(Path(tmp), SERVER_NAME, label="floor")
        certs = (ca, cert, key)
        results = []
        for engine in engines:
            measure(engine, 8, 2000, certs)  # warm-up: first-use costs stay out of the figure
            results.extend(measure(engine, batch, queries, certs, apart=apart) for batch in batches)
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", action="append", choices=("aioquic", "qh3"))
    parser.add_argument("--batch", action="append", type=int)
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument(
        "--apart", action="store_true", help="the server sends each answer in a packet of its own"
    )
    args = parser.parse_args(argv)
    engines = args.engine or [
        name for name in ("aioquic", "qh3") if importlib.util.find_spec(name) is not None
    ]
    for result in run(engines, args.batch or [1, 4, 16], args.queries, apart=args.apart):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
