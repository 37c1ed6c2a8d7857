"""doqproxy's own Python per miss with the cache off (as the engines case runs
``forward --no-cache``), with no QUIC engine and no sockets. With ``--cache``, every
query asks for a different name, so each is a miss that also goes through the cache
lookup, the coalescer (a task of its own) and the cache store.

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

from doqproxy.cache.policy import AnswerCache
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


def _messages(name: str = "n5.bench.test") -> tuple[bytes, bytes]:
    query = dns.message.make_query(name, "A", use_edns=False)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name + ".", 86400, "IN", "A", "10.0.0.5"))
    response.use_edns(0, 0, 1232)
    response.id = 0
    return query.to_wire(), framing.frame(rewrite.pad_response(response.to_wire()))


def _distinct(count: int) -> tuple[list[bytes], dict[bytes, bytes]]:
    """``count`` queries for different names, and each one's answer by its name's octets.

    The names all have the same length, so the scripted session finds a query's
    name at a fixed offset (after the 2-octet frame and the 12-octet header).
    """
    queries, answers = [], {}
    for i in range(count):
        query, answer = _messages(f"n{i:07d}.bench.test")
        queries.append(query)
        answers[query[12 : 12 + NAME_OCTETS]] = answer
    return queries, answers


NAME_OCTETS = len(b"\x08n0000000\x05bench\x04test\x00")


class ScriptedSession:
    """An engine session that answers each stream one loop turn after it is written."""

    def __init__(self, owner: Any, answer: bytes, answers: dict[bytes, bytes] | None) -> None:
        self.owner = owner
        self.answer = answer
        self.answers = answers
        """With the cache on, every query's name differs, and so does its answer."""
        self.stream_limit = 1 << 30
        self.streams_opened = 0
        self.pending: list[tuple[int, bytes]] = []
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
        for stream_id, answer in pending:
            self.owner.on_stream_data(stream_id, answer, True)
        self.owner.on_datagram()

    def send_query(self, data: bytes) -> int:
        stream_id = self.streams_opened * 4
        self.streams_opened += 1
        answers = self.answers
        answer = self.answer if answers is None else answers[data[14 : 14 + NAME_OCTETS]]
        self.pending.append((stream_id, answer))
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


async def measure(queries: int, cached: bool = False) -> dict[str, Any]:
    query, answer = _messages()
    waves = max(1, queries // IN_FLIGHT)
    distinct: list[bytes] = []
    answers = None
    if cached:
        distinct, answers = _distinct((20 + waves) * IN_FLIGHT)
    configuration = client_configuration("bench.test", ca_file=None)  # the real engine's
    fake = SimpleNamespace(
        NAME="scripted",
        new_session=lambda owner, configuration, **_: ScriptedSession(owner, answer, answers),
    )
    doq_connection.engine.get = lambda name=None: fake  # type: ignore[assignment, misc]
    spec = parse_spec("quic://127.0.0.1:853")
    upstream = DoqUpstream(spec.url, configuration, PoolSettings())
    group = UpstreamGroup([Member(key="bench", upstream=upstream)])
    cache = AnswerCache() if cached else None
    resolver = Resolver(group, local=LocalZones(), cache=cache)
    loop = asyncio.get_running_loop()
    replies: list[bytes | None] = []
    sent = iter(distinct)

    async def one(query: bytes) -> None:
        # As the UDP front end runs a miss: the fast cache path has just missed.
        if cache is not None and cache.fast_reply(query, True) is not None:
            raise RuntimeError("a query meant to miss was a cache hit")
        replies.append(await resolver.resolve(query, udp=True, cache_checked=True))

    async def wave() -> None:
        batch = [next(sent) for _ in range(IN_FLIGHT)] if cached else [query] * IN_FLIGHT
        await asyncio.gather(*[loop.create_task(one(q)) for q in batch])

    for _ in range(20):  # warm-up: the connection, first-use costs
        await wave()
    replies.clear()
    gc.collect()
    gc.freeze()  # as the forwarder does once it is up
    cpu0 = time.process_time()
    for _ in range(waves):
        await wave()
    cpu = time.process_time() - cpu0
    if not replies or any(r is None or wire_rcode(r) != 0 for r in replies):
        raise RuntimeError("the scripted pipeline did not answer NOERROR")
    await resolver.aclose()
    return {
        "queries": len(replies),
        "in_flight": IN_FLIGHT,
        "cache": cached,
        "cpu_us_per_query": round(1e6 * cpu / len(replies), 1),
        "event_loop": process.event_loop_name(),
    }


def wire_rcode(reply: bytes) -> int:
    return reply[3] & 0x0F


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=50000)
    parser.add_argument(
        "--cache",
        action="store_true",
        help="with the cache on: every query a different name, so every one a miss",
    )
    args = parser.parse_args(argv)
    print(json.dumps(process.run(lambda: measure(args.queries, args.cache))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
