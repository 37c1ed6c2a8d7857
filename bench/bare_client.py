"""The miss-path ceiling: a bare DoQ client, N streams in flight on K connections.

``python -m bench.bare_client --server 127.0.0.1:P --ca ca.pem --names q.txt --seconds 10``
sends the same queries doqproxy forward would (EDNS, padded to 128 bytes, ID 0) for
the given time and prints one JSON line: answers, rcodes, seconds, queries/s, CPU per
query and datagrams per query each way. ``--engine qh3`` uses qh3 instead of aioquic
(the same API), when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import ssl
import statistics
import struct
import time
from collections import Counter
from typing import Any, cast

import dns.message
import dns.rcode


class Counting:
    """Wraps the client's UDP transport to count the datagrams it sends."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.sent = 0

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent += 1
        self.transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def engine_modules(engine: str) -> dict[str, Any]:
    """aioquic or qh3: the same asyncio API under a different package name."""
    return {
        part: importlib.import_module(f"{engine}.{part}")
        for part in ("asyncio.client", "asyncio.protocol", "quic.configuration", "quic.events")
    }


def client_class(engine: str) -> Any:
    modules = engine_modules(engine)
    events = modules["quic.events"]
    base = modules["asyncio.protocol"].QuicConnectionProtocol

    class BareClient(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.waiters: dict[int, asyncio.Future[bytes]] = {}
            self.buffers: dict[int, bytearray] = {}
            self.received = 0
            self.counting: Counting | None = None
            self.credit: asyncio.Future[None] | None = None

        def connection_made(self, transport: Any) -> None:
            self.counting = Counting(transport)
            super().connection_made(self.counting)
            self._sendto_many = None  # qh3: one sendto per datagram, through the counter

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.received += 1
            super().datagram_received(data, addr)
            self.credit_changed()

        def datagrams_received(self, data: list[bytes], addr: Any) -> None:
            self.received += len(data)  # qh3's own transport reads in batches
            super().datagrams_received(data, addr)
            self.credit_changed()

        def credit_changed(self) -> None:
            if self.credit is not None and not self.credit.done():
                self.credit.set_result(None)

        def may_open(self, stream_id: int) -> bool:
            quic = self._quic
            if engine == "qh3":
                return bool(quic._core.can_send_stream(stream_id))
            return bool(stream_id // 4 < quic._remote_max_streams_bidi)

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, events.StreamDataReceived):
                buffer = self.buffers.setdefault(event.stream_id, bytearray())
                buffer += event.data
                if event.end_stream:
                    del self.buffers[event.stream_id]
                    waiter = self.waiters.pop(event.stream_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(bytes(buffer[2:]))
            elif isinstance(event, events.StreamReset):
                waiter = self.waiters.pop(event.stream_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ConnectionError("stream reset"))

        async def ask(self, wire: bytes) -> bytes:
            # Wait for stream credit (qh3 raises beyond it, aioquic would queue).
            while not self.may_open(self._quic.get_next_available_stream_id()):
                if self.credit is None or self.credit.done():
                    self.credit = asyncio.get_running_loop().create_future()
                await asyncio.shield(self.credit)
            stream_id = self._quic.get_next_available_stream_id()
            waiter = asyncio.get_running_loop().create_future()
            self.waiters[stream_id] = waiter
            self._quic.send_stream_data(stream_id, struct.pack("!H", len(wire)) + wire, True)
            self.transmit()
            return cast(bytes, await waiter)

    return BareClient


def queries(path: str) -> list[bytes]:
    wires = []
    with open(path) as handle:
        for line in handle:
            name, rdtype = line.split()
            message = dns.message.make_query(name, rdtype, use_edns=0, pad=128)
            message.id = 0
            wires.append(message.to_wire())
    return wires


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.server.rpartition(":")
    wires = queries(args.names)
    rcodes: Counter[str] = Counter()
    latencies: list[float] = []
    errors = 0
    position = 0
    modules = engine_modules(args.engine)
    connect = modules["asyncio.client"].connect
    QuicConfiguration = modules["quic.configuration"].QuicConfiguration
    BareClient = client_class(args.engine)
    async with contextlib.AsyncExitStack() as stack:
        clients: list[Any] = []
        for _ in range(args.connections):
            configuration = QuicConfiguration(alpn_protocols=["doq"], is_client=True)
            configuration.server_name = args.server_name
            configuration.load_verify_locations(args.ca)
            configuration.verify_mode = ssl.CERT_REQUIRED
            client = await stack.enter_async_context(
                connect(host, int(port), configuration=configuration, create_protocol=BareClient)
            )
            clients.append(client)
        cpu0 = time.process_time()
        sent0 = sum(c.counting.sent for c in clients)
        received0 = sum(c.received for c in clients)
        started = time.perf_counter()
        deadline = started + args.seconds

        async def worker(client: Any) -> None:
            nonlocal position, errors
            while time.perf_counter() < deadline:
                wire = wires[position % len(wires)]
                position += 1
                sent = time.perf_counter()
                try:
                    answer = await asyncio.wait_for(client.ask(wire), 5.0)
                except (TimeoutError, ConnectionError):
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1000)
                rcodes[dns.rcode.to_text(dns.rcode.Rcode(answer[3] & 0x0F))] += 1

        per_connection = max(1, args.concurrency // args.connections)
        await asyncio.gather(*(worker(c) for c in clients for _ in range(per_connection)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        sent = sum(c.counting.sent for c in clients) - sent0
        received = sum(c.received for c in clients) - received0
    answered = sum(rcodes.values())
    return {
        "answered": answered,
        "errors": errors,
        "rcodes": dict(rcodes),
        "seconds": round(elapsed, 3),
        "qps": answered / elapsed,
        "connections": args.connections,
        "concurrency": per_connection * args.connections,
        "cpu_pct": round(100 * cpu / elapsed),
        "engine": args.engine,
        "cpu_us_per_query": round(1e6 * cpu / answered, 1) if answered else None,
        "datagrams_up_per_query": round(sent / answered, 3) if answered else None,
        "datagrams_down_per_query": round(received / answered, 3) if answered else None,
        "median_ms": round(statistics.median(latencies), 3) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT of the DoQ server")
    parser.add_argument("--server-name", default="doq.bench.test")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--names", required=True, help="dnsperf data file: NAME TYPE per line")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100, help="streams in flight")
    parser.add_argument("--connections", type=int, default=1, help="share them out over these")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--engine", choices=("aioquic", "qh3"), default="aioquic")
    args = parser.parse_args()
    result: dict[str, Any]
    try:
        if args.no_uvloop:
            raise ImportError
        import uvloop

        result = uvloop.run(bench(args))
    except ImportError:
        result = asyncio.run(bench(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
