"""doqproxy's own Python per miss with the cache off (as the engines case runs
``forward --no-cache``), with no QUIC engine and no sockets. With the cache on, a miss
also goes through the coalescer (a task of its own) and the cache store.

The real pipeline (Resolver → UpstreamGroup → DoqUpstream pool → DoqConnection) runs
on the real event loop, but the engine session under the connection is scripted:
it answers every stream written in a loop turn one turn later, with the padded
468-octet answer serve would send. Each query runs in a task of its own, as the
UDP front end runs a miss. What is timed is the process's CPU per query: the
resolver's validation, rewriting and answer checks, the group's and the pool's
bookkeeping, the connection's stream handling, and the tasks and futures that
carry a query through them. Add an engine's floor (``bench.engine_floor``) and
the datagram syscalls, and the result is what a forwarder built this way costs.

``python -m bench.pipeline [--queries N]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rrset

from doqproxy.dns import rewrite
from doqproxy.doq import framing
from doqproxy.ops import process
from doqproxy.resolver import Resolver
from doqproxy.routing.local_zones import LocalZones
from doqproxy.upstream import doq_connection
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.group import Member, UpstreamGroup
from doqproxy.upstream.pool import DoqUpstream, PoolSettings
from doqproxy.upstream.spec import parse_spec

IN_FLIGHT = 50


def _messages() -> tuple[bytes, bytes]:
    query = dns.message.make_query("n5.bench.test", "A", use_edns=False)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("n5.bench.test.", 86400, "IN", "A", "10.0.0.5"))
    response.use_edns(0, 0, 1232)
    response.id = 0
    return query.to_wire(), framing.frame(rewrite.pad_response(response.to_wire()))


class ScriptedSession:
    """An engine session that answers each stream one loop turn after it is written."""

    def __init__(self, owner: Any, answer: bytes) -> None:
        self.owner = owner
        self.answer = answer
        self.stream_limit = 1 << 30
        self.streams_opened = 0
        self.pending: list[int] = []
        self.scheduled = False
        self.probe_timeout = 0.01
        self.smoothed_rtt = 0.001
        self.idle_timeout = 30.0
        self.datagrams = (0, 0)
        self.cipher = None
        self.peer_certificate = None

    async def open(self, address: tuple[str, int]) -> None:
        asyncio.get_running_loop().call_soon(self._handshake)

    def _handshake(self) -> None:
        self.owner.on_handshake("doq", False, False)
        self.owner.on_datagram()

    def transmit_soon(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for stream_id in pending:
            self.owner.on_stream_data(stream_id, self.answer, True)
        self.owner.on_datagram()

    def send_query(self, data: bytes) -> int:
        stream_id = self.streams_opened * 4
        self.streams_opened += 1
        self.pending.append(stream_id)
        return stream_id

    def cancel_stream(self, stream_id: int, error_code: int) -> None:
        pass

    def ping(self) -> None:
        pass

    def close(self, error_code: int, reason: str) -> None:
        pass

    async def wait_closed(self, grace: float) -> None:
        pass

    def abandon(self) -> None:
        pass

    def restart_idle_timer(self) -> None:
        pass


async def measure(queries: int) -> dict[str, Any]:
    query, answer = _messages()
    configuration = client_configuration("bench.test", ca_file=None)  # the real engine's
    fake = SimpleNamespace(
        NAME="scripted",
        new_session=lambda owner, configuration, **_: ScriptedSession(owner, answer),
    )
    doq_connection.engine.get = lambda name=None: fake  # type: ignore[assignment, misc]
    spec = parse_spec("quic://127.0.0.1:853")
    upstream = DoqUpstream(spec.url, configuration, PoolSettings())
    group = UpstreamGroup([Member(key="bench", upstream=upstream)])
    resolver = Resolver(group, local=LocalZones())
    loop = asyncio.get_running_loop()
    replies: list[bytes | None] = []

    async def one() -> None:
        replies.append(await resolver.resolve(query, udp=True, cache_checked=True))

    async def wave() -> None:
        await asyncio.gather(*[loop.create_task(one()) for _ in range(IN_FLIGHT)])

    for _ in range(20):  # warm-up: the connection, first-use costs
        await wave()
    replies.clear()
    gc.collect()
    gc.freeze()  # as the forwarder does once it is up
    cpu0 = time.process_time()
    for _ in range(max(1, queries // IN_FLIGHT)):
        await wave()
    cpu = time.process_time() - cpu0
    if not replies or any(r is None or wire_rcode(r) != 0 for r in replies):
        raise RuntimeError("the scripted pipeline did not answer NOERROR")
    await resolver.aclose()
    return {
        "queries": len(replies),
        "in_flight": IN_FLIGHT,
        "cpu_us_per_query": round(1e6 * cpu / len(replies), 1),
        "event_loop": process.event_loop_name(),
    }


def wire_rcode(reply: bytes) -> int:
    return reply[3] & 0x0F


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=50000)
    args = parser.parse_args(argv)
    print(json.dumps(process.run(lambda: measure(args.queries))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
