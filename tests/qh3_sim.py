"""A qh3 DoQ client and an aioquic server in memory, on virtual time: no sockets, no clock.

The client opens one connection, then keeps as many queries in flight as the server's
stream limit allows until ``queries`` are answered, as doqproxy's pool does in a
burst. The server answers each query once its FIN arrives. The server stalls now and
then (a loaded machine), which makes the client's PTO fire while its congestion
window is full: the ground on which qh3 2.1.0's core fails with "reserved stream is
missing" (see doqproxy/upstream/qh3_reservations.py). Everything is decided by
``seed``, so a run repeats exactly.

Also runnable as a script, to report the failure upstream:
``python -m tests.qh3_sim CA_FILE CERT_FILE KEY_FILE [RUNS]``.
"""

from __future__ import annotations

import heapq
import random
import ssl
import sys
from dataclasses import dataclass
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events as server_events
from aioquic.quic.configuration import QuicConfiguration as ServerConfiguration
from aioquic.quic.connection import QuicConnection as ServerConnection
from aioquic.quic.packet import pull_quic_header
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 853)
QUERY = b"\x00\x80" + bytes(128)
"""A DoQ query as doqproxy sends it: a length prefix, then a message padded to 128 octets."""
ANSWER = b"\x00\x80" + bytes(128)


@dataclass
class Outcome:
    """How one run ended."""

    error: str | None
    """The client's error (ValueError or QuicConnectionError), if its core failed."""
    answered: int
    finished_at: float
    """Virtual seconds."""


def run(
    seed: int,
    certs: tuple[str, str, str],
    *,
    client_class: type[Any] = QuicConnection,
    queries: int = 500,
    delay: float = 0.001,
    stall_chance: float = 0.1,
    stall: float = 0.2,
    horizon: float = 60.0,
    max_events: int = 200_000,
) -> Outcome:
    """One connection, ``queries`` queries; ``certs`` = (CA file, certificate, key)."""
    rnd = random.Random(seed)
    ca_file, cert_file, key_file = certs
    client_configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=["doq"],
        server_name="doq.test",
        verify_mode=ssl.CERT_REQUIRED,
        probe_datagram_size=False,
    )
    client_configuration.load_verify_locations(cafile=ca_file)
    server_configuration = ServerConfiguration(is_client=False, alpn_protocols=["doq"])
    server_configuration.load_cert_chain(cert_file, key_file)
    client = client_class(configuration=client_configuration)
    server: ServerConnection | None = None
    queue: list[tuple[float, int, str, Any]] = []
    sequence = 0

    def push(when: float, kind: str, data: Any = None) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(queue, (when, sequence, kind, data))

    def client_send(now: float) -> None:
        for data, _ in client.datagrams_to_send(now=now):
            push(now + delay, "to_server", data)
        timer = client.get_timer()
        if timer is not None:
            push(timer, "client_timer", timer)

    def server_send(now: float) -> None:
        assert server is not None
        for data, _ in server.datagrams_to_send(now=now):
            push(now + delay, "to_client", data)
        timer = server.get_timer()
        if timer is not None:
            push(timer, "server_timer", timer)

    now = 0.0
    server_busy_until = 0.0
    connected = False
    opened = 0
    answered: set[int] = set()
    try:
        client.connect(SERVER, now=now)
        client_send(now)
        while queue and len(answered) < queries and now < horizon:
            if sequence > max_events:
                return Outcome(f"stuck: {max_events} events by {now:.3f} s", len(answered), now)
            now, _, kind, data = heapq.heappop(queue)
            if kind == "to_server":
                if now < server_busy_until:
                    push(server_busy_until, kind, data)
                    continue
                if rnd.random() < stall_chance:
                    server_busy_until = now + 0.02 + rnd.random() * stall
                if server is None:
                    header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                    server = ServerConnection(
                        configuration=server_configuration,
                        original_destination_connection_id=header.destination_cid,
                    )
                server.receive_datagram(data, CLIENT, now=now)
                while (event := server.next_event()) is not None:
                    if isinstance(event, server_events.StreamDataReceived) and event.end_stream:
                        server.send_stream_data(event.stream_id, ANSWER, end_stream=True)
                server_send(now)
            elif kind == "server_timer":
                if server is not None and server.get_timer() == data:
                    server.handle_timer(now=now)
                    while server.next_event() is not None:
                        pass
                    server_send(now)
            elif kind == "client_timer":
                if client.get_timer() == data:
                    client.handle_timer(now=now)
                    client_send(now)
            else:
                client.receive_datagram(data, SERVER, now=now)
                while (client_event := client.next_event()) is not None:
                    if isinstance(client_event, events.HandshakeCompleted):
                        connected = True
                    elif (
                        isinstance(client_event, events.StreamDataReceived)
                        and client_event.end_stream
                    ):
                        answered.add(client_event.stream_id)
                if connected:
                    core = getattr(client, "_core", None)  # qh3 1.x has none
                    if core is None:
                        limit = int(client._remote_max_streams_bidi)
                    else:
                        limit = int(core.stream_limits[0])
                    while opened < queries and opened < limit:
                        stream_id = client.get_next_available_stream_id()
                        client.send_stream_data(stream_id, QUERY, end_stream=True)
                        opened += 1
                client_send(now)
    except (ValueError, QuicConnectionError) as exc:
        return Outcome(str(exc), len(answered), now)
    return Outcome(None, len(answered), now)


def main(argv: list[str]) -> int:
    import qh3

    certs = (argv[1], argv[2], argv[3])
    runs = int(argv[4]) if len(argv) > 4 else 20
    failed = 0
    for seed in range(runs):
        outcome = run(seed, certs)
        if outcome.error is not None:
            failed += 1
            print(f"seed {seed}: {outcome.error} at {outcome.finished_at:.3f} s")
    print(f"qh3 {qh3.__version__}: {failed}/{runs} runs failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
